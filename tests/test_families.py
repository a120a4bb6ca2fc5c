"""The family registry: one detection function for every kind of input, injection points as objects, and a made-up
family registered inside a test running through attach, a training step and a pipeline call with no other edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import save_file
from torch import nn

from controlnext import ControlNeXtModel, attach, attached, families
from controlnext.families import Family, InjectionPoint, detect_family, get_family, injection_point
from controlnext.pipelines.common import ControlNeXtPipelineMixin, with_controlnext
from controlnext.testing.data import write_tiny_base
from controlnext.testing.models import TINY_CONTROLNEXT, tiny_controlnext, tiny_unet


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", ["sd15", "sdxl", "svd"])
def test_detect_family_from_model_config_and_mapping(name):
    unet = tiny_unet(name)
    assert detect_family(unet).name == name
    assert detect_family({**dict(unet.config), "_class_name": type(unet).__name__}).name == name


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_detect_family_from_folder_and_pipeline(tmp_path, name):
    folder = write_tiny_base(tmp_path / name, name)
    assert detect_family(folder).name == name
    assert detect_family(str(folder / "unet")).name == name  # the denoiser's own folder
    pipe = get_family(name).pipeline_class().from_pretrained(folder, **get_family(name).pipeline_kwargs)
    assert detect_family(pipe).name == name


def test_detect_family_from_svd_folder(tmp_path):
    unet = tiny_unet("svd")
    unet.save_pretrained(tmp_path / "unet")
    assert detect_family(tmp_path).name == "svd"


@pytest.mark.parametrize(("key", "name"), [("cond_stage_model.x.w", "sd15"), ("conditioner.embedders.1.w", "sdxl")])
def test_detect_family_from_single_file_keys(tmp_path, key, name):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, str(path))
    assert detect_family(path).name == name


def test_unknown_family_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"known families: .*sd15.*"):
        detect_family({"_class_name": "SomethingElse"})
    with pytest.raises(ValueError, match="could not be read"):
        detect_family(tmp_path)  # an empty folder
    known = r"\['flux', 'sd15', 'sd3', 'sdxl', 'svd'"
    with pytest.raises(ValueError, match=r"Unknown base-model family 'nope'; known families: " + known):
        get_family("nope")


def test_unknown_injection_point_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="Unknown injection point 'somewhere'"):
        injection_point("somewhere")
    with pytest.raises(ValueError, match="offers"):
        get_family("sd15").point("after_body_0")


def test_every_caller_detects_through_the_registry(tmp_path):
    """The CLI, the web app and training pick the SDXL classes for an SDXL folder by asking the registry."""
    from controlnext.commands.generate import load_pipeline
    from controlnext.training.base import load_base_model
    from controlnext.web.models import _load_base

    folder = write_tiny_base(tmp_path / "xl", "sdxl")
    module = tmp_path / "module"
    tiny_controlnext("sdxl").save_pretrained(module)
    pipe = load_pipeline(str(folder), "cpu", torch.float32, str(module))
    assert type(pipe).__name__ == "StableDiffusionXLControlNeXtPipeline"
    assert type(_load_base(str(folder), torch.float32)).__name__ == "StableDiffusionXLControlNeXtPipeline"
    base = load_base_model(str(folder))
    assert base.family == "sdxl" and len(base.text_encoders) == 2


# ---------------------------------------------------------------------------------------------- a made-up family
class ToyBackbone(ModelMixin, ConfigMixin):
    """A tiny denoiser unlike any UNet: conv_in, a body of convs, conv_out; called as ``(x, t)``."""

    @register_to_config
    def __init__(self, channels: int = 4, width: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.body = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(2)])
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = False):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        h = self.conv_in(x) + self.time(t)[:, :, None, None]
        for block in self.body:
            h = torch.relu(block(h))
        return (self.conv_out(h),)


class ToyPipeline(DiffusionPipeline):
    """A minimal denoising loop over the toy backbone: the "stock" pipeline, with no knowledge of ControlNeXt."""

    vae_scale_factor = 8  # the module's features are at 1/8 of the condition, like a latent grid

    def __init__(self, net: ToyBackbone, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(net=net, scheduler=scheduler)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return False

    def __call__(self, height: int = 64, width: int = 64, num_inference_steps: int = 3, generator=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None):  # fmt: skip
        f = self.vae_scale_factor
        x = torch.randn(1, self.net.config.channels, height // f, width // f, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.scheduler.timesteps):
            x = self.scheduler.step(self.net(x, t)[0], t, x).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        return x


@with_controlnext(ToyPipeline)
class ToyControlNeXtPipeline(ControlNeXtPipelineMixin, ToyPipeline):
    """The toy pipeline with ControlNeXt, made the way the SD pipelines are."""


TOY_POINT = InjectionPoint("after_body_0", "body.0", "post", lambda c: c.width, "on the first body conv's output")
TOY = Family(
    name="toy",
    title="Toy DiT-less model",
    matches=lambda c: c.get("_class_name") == "ToyBackbone",
    points=(TOY_POINT,),
    variants=(),
    light_variant="sdxl",
    default_variant="sdxl",
    resolution=64,
    trainable_patterns=(r"body\.1\.",),
    pipelines={"text2img": ToyControlNeXtPipeline},
    denoiser="net",
    call_args=("x", "t"),
    kind="backbone",
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(families._REGISTRY, TOY.name, TOY)  # registered for this test only
    torch.manual_seed(0)
    backbone = ToyBackbone().eval()
    module = ControlNeXtModel(variant="toy", injection_point="after_body_0", out_channels=16, **TINY_CONTROLNEXT)
    return backbone, module.eval()


def _reference(backbone, module, x, t, cond):
    """The toy forward written out, control added after body.0 (Cross Normalization as released)."""
    with torch.no_grad():
        feats = module(cond, t).sample
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        h = backbone.body[0](backbone.conv_in(x) + backbone.time(tt)[:, :, None, None])
        mh, sh = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
        mc, sc = feats.mean(dim=(1, 2, 3), keepdim=True), feats.std(dim=(1, 2, 3), keepdim=True)
        c = torch.nn.functional.adaptive_avg_pool2d((feats - mc) * (sh / (sc + 1e-12)) + mh, h.shape[-2:])
        h = torch.relu(h + c * module.effective_scale() * 0.5)
        return backbone.conv_out(torch.relu(backbone.body[1](h)))


def test_made_up_family_attach_matches_reference(toy):
    backbone, module = toy
    assert detect_family(backbone) is TOY
    x, cond, t = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64), torch.tensor(500)
    with torch.no_grad():
        base = backbone(x, t)[0]
        with attached(backbone, module, cond, 0.5):
            got = backbone(x, t)[0]
        after = backbone(x, t)[0]
    torch.testing.assert_close(got, _reference(backbone, module, x, t, cond), rtol=1e-4, atol=1e-5)
    assert torch.equal(base, after) and (got - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="does not fit this toy backbone"):
        attach(backbone, ControlNeXtModel(variant="toy", injection_point="after_body_0", out_channels=8))


def test_made_up_family_training_step(toy):
    from controlnext.training.trainable import select_unet_parameters

    backbone, module = toy
    module.train()
    names = set(select_unet_parameters(backbone, list(TOY.trainable_patterns)))
    assert names == {"body.1.weight", "body.1.bias"}
    params = [p for n, p in backbone.named_parameters() if n in names] + list(module.parameters())
    backbone.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    opt = torch.optim.SGD(params, lr=0.1)
    x, noise, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    with attached(backbone, module, cond, cache_static=False):
        loss = torch.nn.functional.mse_loss(backbone(x + noise, torch.tensor([10, 900]))[0], noise)
    loss.backward()
    opt.step()
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # only the family's trainable subset moved in the backbone
    assert module.down_res[0].conv1.weight.grad is not None


def test_made_up_family_pipeline_call(toy):
    backbone, module = toy
    pipe = TOY.pipeline_class()(net=backbone, scheduler=DDIMScheduler(num_train_timesteps=1000), controlnext=module)
    assert pipe.backbone is backbone
    cond = torch.rand(1, 3, 64, 64)
    plain = ToyPipeline(net=backbone, scheduler=DDIMScheduler(num_train_timesteps=1000))
    off = plain(generator=torch.Generator().manual_seed(0))
    on = pipe(control_image=cond, generator=torch.Generator().manual_seed(0))
    zero = pipe(control_image=cond, controlnext_conditioning_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(off, zero) and (on - off).abs().max() > 1e-4
    assert not backbone._forward_pre_hooks and not backbone.body[0]._forward_hooks  # detached after the call


def test_families_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, controlnext.families; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_family_names_outside_the_registry():
    """Per-family branches live in the registry: no `family == "sdxl"`-style tests elsewhere in the package."""
    src = Path(__file__).resolve().parents[1] / "src" / "controlnext"
    offenders = []
    for path in src.rglob("*.py"):
        if str(path.relative_to(src)) in {"families.py", "models/variants.py", "testing/models.py"}:
            continue
        text = path.read_text()
        for needle in ('family == "sdxl"', 'family == "sd15"', 'family == "svd"', '"text_encoder_2" in'):
            if needle in text:
                offenders.append(f"{path.relative_to(src)}: {needle}")
    assert not offenders, offenders
    assert json.loads(json.dumps([f.name for f in families.families()])) == ["flux", "sd3", "svd", "sdxl", "sd15"]


def test_no_import_cycles_inside_the_package():
    """Module-level imports inside controlnext form no cycle (imports inside functions are deliberate and lazy)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src"
    graph: dict[str, set[str]] = {}
    for path in (src / "controlnext").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        package = name if is_pkg else name.rsplit(".", 1)[0]
        deps = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.startswith("controlnext"):
                    deps.add(base)
                    deps.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("controlnext"))
    # A module's own ancestor packages are initialised before it whatever it imports: not a cycle.
    graph = {k: {d for d in v if d in graph and d != k and not k.startswith(d + ".")} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
