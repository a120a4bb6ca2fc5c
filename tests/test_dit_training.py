"""`controlnext train` for the transformer families (SD3, Flux): the flow-matching objective against a float64
reference written here, runs whose exported modules load into the matching pipelines, the timestep convention the
module sees, caption encoding once per caption, the default trainable subset, exact resume and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from controlnext.cli import main as cli_main
from controlnext.families import get_family
from controlnext.training import parse_train_args, train
from controlnext.training.objectives import (
    FlowMatching,
    flow_matching_inputs,
    flow_matching_loss,
    flow_matching_u,
)

FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def dit_bases(tmp_path_factory):
    """Tiny SD3 and Flux base folders (stock pipeline layouts, flow-matching scheduler, shifted/scaled VAE)."""
    from controlnext.testing.data import write_tiny_base

    return {f: write_tiny_base(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from controlnext.testing.data import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("dit-shapes"), n=8)


def _args(base, data, out, *extra):
    return [
        "--model", str(base), "--dataset", str(data), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "2", "--learning-rate", "1e-3",
        "--unet-learning-rate", "1e-3", "--cpu-threads", "1", "--report-to", "none", "--max-sequence-length", "8",
        *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the objective
def _reference_sigma(index: int, shift: float) -> float:
    """The training table of FlowMatchEulerDiscreteScheduler written out: t = 1000 - index, s = t / 1000, shifted."""
    s = (1000 - index) / 1000
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
@pytest.mark.parametrize("precondition", [False, True])
def test_flow_matching_against_float64_reference(scheme, precondition):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    u = torch.tensor([0.05, 0.5, 0.93])
    noisy, timesteps, sigmas = flow_matching_inputs(scheduler, x0, noise, u)
    objective = FlowMatching(weighting_scheme=scheme, precondition_outputs=precondition)
    loss = flow_matching_loss(objective, pred, noisy, x0, noise, sigmas)

    total = 0.0
    for b, idx in enumerate((50, 500, 930)):
        sig = _reference_sigma(idx, 3.0)
        assert timesteps[b].item() == pytest.approx(sig * 1000, rel=1e-6)  # SD3's timestep: sigma * 1000
        x, n, p = x0[b].double(), noise[b].double(), pred[b].double()
        ref_noisy = (1 - sig) * x + sig * n
        torch.testing.assert_close(noisy[b].double(), ref_noisy, rtol=1e-6, atol=1e-6)
        weight = {"cosmap": 2 / (math.pi * (1 - 2 * sig + 2 * sig**2)), "sigma_sqrt": sig**-2.0}.get(scheme, 1.0)
        if precondition:  # x0 estimate from the predicted velocity, against x0
            err = (ref_noisy - sig * p) - x
        else:  # velocity, against noise - x0
            err = p - (n - x)
        total += (weight * err**2).mean().item()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_timestep_density_per_sample_generators(scheme):
    objective = FlowMatching(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.7, mode_scale=1.29)
    u = flow_matching_u(objective, [torch.Generator().manual_seed(s) for s in (1, 2)])
    for row, seed in enumerate((1, 2)):
        g = torch.Generator().manual_seed(seed)
        if scheme == "logit_normal":
            ref = 1 / (1 + math.exp(-(0.3 + 0.7 * torch.randn(1, generator=g, dtype=torch.float64).item())))
        else:
            r = torch.rand(1, generator=g).double().item()
            ref = 1 - r - 1.29 * (math.cos(math.pi * r / 2) ** 2 - 1 + r) if scheme == "mode" else r
        assert u[row].item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="Unknown weighting scheme 'uniform'"):
        FlowMatching(weighting_scheme="uniform")


# ---------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def runs(dit_bases, data, tmp_path_factory):
    """One `controlnext train` run per family (3 steps), recording the timesteps the module and transformer saw and
    how often the T5 encoder ran."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5EncoderModel

    from controlnext.models.controlnext import ControlNeXtModel
    from controlnext.training.dit import TransformerPromptEncoder

    seen: dict[str, list] = {}

    def spy(cls, name, record):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            record(*args, **kwargs)
            return original(self, *args, **kwargs)

        mp.setattr(cls, name, wrapper)

    out = {}
    mp = pytest.MonkeyPatch()
    spy(ControlNeXtModel, "forward_static", lambda static, t: seen["module"].append(t.flatten().clone()))
    for cls in (SD3Transformer2DModel, FluxTransformer2DModel):
        spy(cls, "forward", lambda *a, **kw: seen["transformer"].append(kw["timestep"].flatten().clone()))
    spy(T5EncoderModel, "forward", lambda *a, **kw: seen["t5"].append(1))
    spy(TransformerPromptEncoder, "__call__", lambda captions: seen["captions"].extend(captions))
    try:
        for family in FAMILIES:
            seen.update(module=[], t5=[], transformer=[], captions=[])
            folder = tmp_path_factory.mktemp(f"run-{family}")
            code = cli_main(["train", *_args(dit_bases[family], data, folder, "--max-train-steps", "3")])
            out[family] = dict(code=code, out=folder, **{k: list(v) for k, v in seen.items()})
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_train_run_loss_finite_and_module_loads_into_its_pipeline(runs, dit_bases, family):
    import json

    run = runs[family]
    assert run["code"] == 0
    summary = json.loads((run["out"] / "train_summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    card = (run["out"] / "README.md").read_text()
    assert "flow matching" in card and "min-SNR" not in card
    # The exported module names its family, loads into that family's pipeline with the transformer subset, runs.
    fam = get_family(family)
    pipe = fam.pipeline_class().from_pretrained(dit_bases[family])
    module = pipe.load_controlnext(run["out"] / "controlnext.safetensors")
    assert module.config.family == family
    assert pipe.load_unet_weights(run["out"] / "unet_weights.safetensors") == "values"
    cond = torch.rand(1, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    image = pipe("a red circle", control_image=cond, num_inference_steps=2, height=64, width=64,
                 max_sequence_length=8, output_type="pt", generator=gen).images  # fmt: skip
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_module_of_one_family_refused_by_the_other_pipeline(runs, dit_bases):
    sd3 = get_family("sd3").pipeline_class().from_pretrained(dit_bases["sd3"])
    for path in (runs["flux"]["out"] / "controlnext.safetensors", runs["flux"]["out"] / "controlnext"):
        with pytest.raises(ValueError, match="flux") as err:
            sd3.load_controlnext(path)
        assert "sd3" in str(err.value)
    flux = get_family("flux").pipeline_class().from_pretrained(dit_bases["flux"])
    with pytest.raises(ValueError, match="sd3"):
        flux.load_controlnext(runs["sd3"]["out"] / "controlnext.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_module_sees_the_scheduler_timestep_in_0_1000(runs, family):
    """SD3 calls the transformer with t, Flux with t / 1000 (as their pipelines do); the module always gets the
    training table's t in [0, 1000], the scale it gets at inference."""
    table = FlowMatchEulerDiscreteScheduler().timesteps  # the tiny bases' scheduler (shift 1)
    module, transformer = torch.cat(runs[family]["module"]), torch.cat(runs[family]["transformer"])
    assert len(module) == len(transformer) == 3 * 2  # three steps of two samples
    for t in module:
        assert torch.isclose(table, t.float(), rtol=1e-5, atol=1e-3).any(), f"{t} is not in the training table"
    expected = transformer * (1000 if family == "flux" else 1)
    torch.testing.assert_close(module.float(), expected.float(), rtol=1e-6, atol=1e-3)
    assert module.max() > 1.0 and (transformer.max() <= 1.0) == (family == "flux")


def test_t5_runs_once_per_caption(runs):
    for family in FAMILIES:
        # Each distinct caption of the 6 drawn is encoded once (one at a time), later draws come from the cache.
        assert len(runs[family]["captions"]) == 6
        assert len(runs[family]["t5"]) == len(set(runs[family]["captions"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_trainable_subset_is_the_image_output_projections_after_the_injection_point(runs, family):
    state = load_file(runs[family]["out"] / "unet_weights.safetensors")
    # The tiny transformers have 6 double-stream/joint blocks; the module is injected after block 0 (the default).
    want = [f"transformer_blocks.{k}.attn.to_out.0.{w}" for k in range(1, 6) for w in ("bias", "weight")]
    assert sorted(state) == want


def test_resume_is_bit_identical(dit_bases, data, tmp_path):
    """Flux (packed latents, guidance embedding), preconditioned outputs with cosmap weighting, caption dropout."""
    extra = ["--max-train-steps", "4", "--checkpointing-steps", "2", "--caption-dropout", "0.5",
             "--weighting-scheme", "cosmap", "--precondition-outputs", "--random-flip"]  # fmt: skip
    ref = train(parse_train_args(_args(dit_bases["flux"], data, tmp_path / "straight", *extra)))
    split = _args(dit_bases["flux"], data, tmp_path / "split", *extra)
    first = train(parse_train_args([*split, "--exit-after-steps", "2"]))
    second = train(parse_train_args([*split, "--resume-from-checkpoint", "latest"]))
    assert first.global_step == 2 and second.global_step == 4
    assert first.losses + second.losses == ref.losses
    for name in ("controlnext.safetensors", "unet_weights.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs")


def test_options_of_the_other_objective_are_refused(dit_bases, data, sd15, tmp_path, capsys):
    assert cli_main(["train", *_args(dit_bases["sd3"], data, tmp_path / "a", "--snr-gamma", "5")]) == 2
    assert "--snr-gamma is a DDPM option; Stable Diffusion 3 trains with flow matching" in capsys.readouterr().err
    args = _args(sd15, data, tmp_path / "b", "--guidance-scale", "3.5")
    args.remove("--max-sequence-length"), args.remove("8")
    assert cli_main(["train", *args]) == 2
    assert "--guidance-scale applies to flow-matching families (SD3, Flux)" in capsys.readouterr().err
    # A size that is not a whole number of 2x2 latent patches.
    assert cli_main(["train", *_args(dit_bases["flux"], data, tmp_path / "c", "--resolution", "72")]) == 2
    assert "--resolution must be a multiple of 16" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_bf16_and_validation(dit_bases, data, tmp_path, family):
    """Gradient checkpointing and bf16 autocast (frozen weights in bf16, trained ones in float32), and a validation
    grid made by the family's ControlNeXt pipeline with its flow-matching scheduler."""
    cond = next((data / "conditions").iterdir())
    extra = ["--max-train-steps", "2", "--gradient-checkpointing", "--mixed-precision", "bf16",
             "--validation-prompt", "a red circle", "--validation-image", str(cond), "--validation-steps", "2",
             "--validation-inference-steps", "2"]  # fmt: skip
    result = train(parse_train_args(_args(dit_bases[family], data, tmp_path, *extra)))
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 2
    assert result.unet.is_gradient_checkpointing
    dtypes = {(p.dtype, p.requires_grad) for p in result.unet.parameters()}
    assert dtypes == {(torch.bfloat16, False), (torch.float32, True)}
    assert (tmp_path / "validation" / "step-0000002.png").is_file()


def test_checkpointed_transformer_training_call_matches_and_releases_its_hooks():
    """Checkpointing re-runs whole transformer blocks, the hooked one included, in the backward pass: the training
    wrapper keeps its hooks until then, gives the gradients of the un-checkpointed call, and release() removes them."""
    from controlnext.testing.models import tiny_controlnext, tiny_transformer
    from controlnext.training.core import ControlledBackbone

    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(2, 7, 48, generator=g), pooled_projections=torch.randn(2, 64),
              timestep=torch.tensor([700.0, 30.0]))  # fmt: skip
    grads = []
    for checkpointing in (False, True):
        tr, module = tiny_transformer("sd3"), tiny_controlnext("sd3")
        tr.requires_grad_(False)
        tr.transformer_blocks[5].attn.to_out[0].weight.requires_grad_(True)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        model = ControlledBackbone(tr, module)
        model(x, condition=cond, **kw).square().mean().backward()
        grads.append([module.mid_convs[1].weight.grad, tr.transformer_blocks[5].attn.to_out[0].weight.grad])
        model.release()
        point = get_family("sd3").point(module.config.injection_point)
        assert not point.submodule(tr)._forward_hooks and not tr._forward_pre_hooks
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_cache_trains_like_the_images_and_records_the_t5_length(dit_bases, data, tmp_path, family):
    """make-shards --cache-latents on a DiT base: T5 runs once per caption when the cache is made; training on the
    cache gives the losses of training on the images, and another T5 length is refused."""
    from controlnext.cli import main
    from controlnext.training import parse_train_args, train

    shards, cache = tmp_path / "shards", tmp_path / "cache"
    assert main(["make-shards", str(data), str(shards), "--samples-per-shard", "3"]) == 0
    assert main(["make-shards", str(data), str(cache), "--samples-per-shard", "3", "--cache-latents", "--base",
                 str(dit_bases[family]), "--resolution", "64", "--cpu", "--max-sequence-length", "8"]) == 0  # fmt: skip
    record = json.loads((cache / "shards.json").read_text())["cache"]
    assert record["family"] == family and record["text_tokens"] == 8
    common = ["--center-crop", "--caption-dropout", "0.5", "--max-train-steps", "2"]
    images = train(parse_train_args(_args(dit_bases[family], shards, tmp_path / "images", *common)))
    cached = train(parse_train_args(_args(dit_bases[family], cache, tmp_path / "cached", *common)))
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(images.losses), rtol=1e-5, atol=0)
    other = [a if a != "8" else "16" for a in _args(dit_bases[family], cache, tmp_path / "other", *common)]
    with pytest.raises(ValueError, match=r"T5 length \(--max-sequence-length\) 8 -> 16"):
        train(parse_train_args(other))
