"""Base-model families and their injection points, as data: the one place that knows SD1.5, SDXL and SVD.

A :class:`Family` holds everything that differs between bases: how to recognise one (from a model object, a
pipeline, a config or a folder), where ControlNeXt control can be injected (:class:`InjectionPoint` objects), the
published defaults (control-module variant, resolution, trainable UNet parameters), how prompts and added
conditioning are built for training, and which pipeline classes serve it. Every caller (the adapter, loading,
training, validation, the CLI and the web app) asks :func:`detect_family` and :func:`get_family`; adding a family is
one :func:`register_family` call. This module imports no torch, so the CLI stays fast to start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DIT_POINTS",
    "Family",
    "InjectionPoint",
    "UNET_POINTS",
    "detect_family",
    "families",
    "family_of_variant",
    "get_family",
    "injection_point",
    "register_family",
]

Layout = Literal["image", "video", "tokens"]


@dataclass(frozen=True)
class InjectionPoint:
    """Where control is added: one submodule of the backbone, before (``pre``) or after (``post``) it runs.

    ``module`` is the dotted submodule path (``"down_blocks.0"``). A ``pre`` point edits the submodule's input named
    ``hidden_kwarg`` (or its first positional argument); a ``post`` point edits its output: the tensor itself
    (``output_index=None``) or element ``output_index`` of a returned tuple, leaving the other elements (skip
    tensors) as they are. ``channels`` reads the hidden state's channel count from the backbone's config, and
    ``layout`` names the hidden state's shape: ``image`` (B, C, H, W), ``video`` (B*F, C, H, W), ``tokens`` (B, N, D).
    """

    name: str
    module: str
    when: Literal["pre", "post"]
    channels: Callable[[Any], int]
    description: str
    hidden_kwarg: str = "hidden_states"
    output_index: int | None = None
    layout: Layout = "image"

    def submodule(self, backbone: nn.Module) -> nn.Module:
        """The backbone's submodule this point hooks."""
        try:
            return backbone.get_submodule(self.module)
        except AttributeError as err:
            raise ValueError(
                f"Injection point {self.name!r} needs the submodule {self.module!r}, which this "
                f"{type(backbone).__name__} does not have."
            ) from err

    def hook(
        self, backbone: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor], prepend: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Register ``edit`` (hidden state -> new hidden state; the same object for no change) at this point."""
        target = self.submodule(backbone)
        if self.when == "pre":
            key = self.hidden_kwarg

            def pre(module, args, kwargs):
                if key in kwargs:
                    new = edit(kwargs[key])
                    return None if new is kwargs[key] else (args, {**kwargs, key: new})
                new = edit(args[0])
                return None if new is args[0] else ((new, *args[1:]), kwargs)

            return target.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)

        index = self.output_index

        def post(module, args, output):
            if index is None:
                new = edit(output)
                return None if new is output else new
            new = edit(output[index])
            return None if new is output[index] else (*output[:index], new, *output[index + 1 :])

        return target.register_forward_hook(post, prepend=prepend)

    def bracket(
        self, backbone: nn.Module, before: Callable[..., None], after: Callable[..., None]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that run ``before`` ahead of every hook at this point and ``after`` behind them (for timing)."""
        target = self.submodule(backbone)
        register = target.register_forward_pre_hook if self.when == "pre" else target.register_forward_hook
        return [register(before, prepend=True), register(after)]


def _first_channels(config: Any) -> int:
    return config.block_out_channels[0]


def _last_channels(config: Any) -> int:
    return config.block_out_channels[-1]


# The UNet injection points (SD1.5, SDXL and SVD UNets share block structure and call conventions).
UNET_POINTS = (
    InjectionPoint(
        "before_down_block_0",
        "down_blocks.0",
        "pre",
        _first_channels,
        "after conv_in, before down block 0; conv_in's skip tensor stays un-controlled",
    ),
    InjectionPoint(
        "after_down_block_0",
        "down_blocks.0",
        "post",
        _first_channels,
        "on down block 0's returned hidden state; the skip tensors it returned stay un-controlled",
        output_index=0,
    ),
    InjectionPoint(
        "before_mid_block",
        "mid_block",
        "pre",
        _last_channels,
        "on the last down block's output as the mid block receives it, after every skip tensor was collected",
    ),
    InjectionPoint(
        "after_mid_block",
        "mid_block",
        "post",
        _last_channels,
        "on the mid block's output, before the up blocks",
    ),
)


def _sample_grid(sample: torch.Tensor, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """The latent grid of a call whose sample is (..., C, h, w): UNets and SD3."""
    return tuple(sample.shape[-2:])


@dataclass(frozen=True)
class Family:
    """One base-model family: recognition, injection points, published defaults and pipelines.

    ``matches`` takes the denoiser's config as a mapping (with ``_class_name``). ``variants`` are the published
    control-module layouts for this family; ``light_variant`` is the one a 3.5M-layout file is read as (those share
    keys and shapes across families) and ``default_variant`` the layout of a newly trained module. ``pipelines`` maps a
    task (``text2img``, ``img2img``, ``inpaint``, ``video``) to a pipeline class, or its name in
    :mod:`controlnext.pipelines`. In ``trainable_patterns``, ``{after}`` stands for the index of any block after the
    injection point's (``transformer_blocks.4`` -> 5, 6, ...).
    """

    name: str
    title: str
    matches: Callable[[Mapping[str, Any]], bool]
    points: tuple[InjectionPoint, ...]
    variants: tuple[str, ...]
    light_variant: str
    default_variant: str
    resolution: int
    trainable_patterns: tuple[str, ...]
    pipelines: Mapping[str, str | type]
    denoiser: str = "unet"  # the pipeline component (and folder) holding the backbone
    kind: str = "UNet"  # what messages call the backbone
    # Names of the denoiser's first two call arguments (the noisy sample, the timestep).
    call_args: tuple[str, str] = ("sample", "timestep")
    video: bool = False
    # Prompt encoding for training: the number of text encoders, and whether (as SDXL was trained) the penultimate
    # hidden layer is used and the last encoder's pooled output feeds the added text/time conditioning.
    text_encoders: int = 1
    sdxl_text_conditioning: bool = False
    # The stock VAE of the family overflows in fp16 (SDXL): training keeps it in float32.
    vae_fp32: bool = False
    # Extra keyword arguments when building the family's pipeline from loose components (no safety checker).
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Key prefixes that identify a single-file (original layout) checkpoint of this family.
    checkpoint_keys: tuple[str, ...] = ()
    # The reference checkpoint's denoiser config (benchmarks build it with random weights).
    published_config: Mapping[str, Any] = field(default_factory=dict)
    # The encoder always sees timesteps in [0, 1000]: the backbone's timestep argument times this (Flux is called
    # with t / 1000), so a module sees the same scale in training and at inference.
    timestep_scale: float = 1.0
    # Latent pixels per token side (a transformer's patch): generated sizes are multiples of the VAE factor times it.
    latent_patch: int = 1
    # Classifier-free guidance batches [unconditional, conditional] halves into one call (the pipelines' flag
    # ``do_classifier_free_guidance``); ``False`` where guidance is distilled or runs as separate calls (Flux).
    cfg_batch: bool = True
    # The latent grid (h, w) of one backbone call, from its sample and keyword arguments (conditions are resized to
    # it times the VAE factor).
    latent_grid: Callable[[torch.Tensor, Mapping[str, Any]], tuple[int, int]] = _sample_grid
    # The training objective: "ddpm" (epsilon / v-prediction) or "flow_matching" (rectified flow, as diffusers'
    # SD3 and Flux ControlNet scripts train), and its defaults (fields of training.objectives.FlowMatching, and
    # the guidance embedding's value for a guidance-distilled transformer).
    objective: str = "ddpm"
    objective_defaults: Mapping[str, Any] = field(default_factory=dict)

    def point(self, name: str) -> InjectionPoint:
        """The injection point called ``name``; an unknown name is an error that lists this family's points."""
        for p in self.points:
            if p.name == name:
                return p
        raise ValueError(
            f"The {self.title} backbone has no injection point {name!r}; it offers {[p.name for p in self.points]}."
        )

    def trainable(self, point: str, patterns: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """``patterns`` (default: the family's ``trainable_patterns``) with ``{after}`` made concrete for injection
        point ``point``: a regex of the block indices after the one it hooks."""
        patterns = list(self.trainable_patterns if patterns is None else patterns)
        if not any("{after}" in p for p in patterns):
            return patterns
        module = self.point(point).module
        head, _, index = module.rpartition(".")
        if not index.isdigit():
            raise ValueError(f"'{{after}}' in a trainable pattern needs a numbered block; {point!r} hooks {module!r}.")
        before = "|".join(str(i) for i in range(int(index) + 1))
        return [p.replace("{after}", rf"(?!(?:{before})\.)\d+") for p in patterns]

    def pipeline_class(self, task: str = "text2img") -> type:
        """The ControlNeXt pipeline class for ``task``."""
        if task not in self.pipelines:
            raise ValueError(f"No {task} pipeline for {self.title}; available: {sorted(self.pipelines)}.")
        cls = self.pipelines[task]
        if isinstance(cls, str):  # a name in controlnext.pipelines, imported on first use
            from . import pipelines

            cls = getattr(pipelines, cls)
        return cls

    def stock_pipeline_class(self, task: str = "text2img") -> type:
        """The stock diffusers pipeline that :meth:`pipeline_class` extends (for writing plain diffusers folders)."""
        cls = self.pipeline_class(task)
        return next(base for base in cls.__mro__[1:] if base.__module__.startswith("diffusers."))

    def added_conditioning(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
        """The UNet's ``added_cond_kwargs`` for training (SDXL's pooled text and size ids), else ``None``."""
        if not self.sdxl_text_conditioning:
            return None
        return {"text_embeds": pooled, "time_ids": time_ids}


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family. Detection tries families in registration order, newest first."""
    _REGISTRY.pop(family.name, None)
    _REGISTRY[family.name] = family
    return family


def families() -> list[Family]:
    """The registered families, in detection order (most recently registered first)."""
    return list(reversed(_REGISTRY.values()))


def get_family(name: str | Family) -> Family:
    """The family called ``name``; an unknown name is an error that lists the known ones."""
    if isinstance(name, Family):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"Unknown base-model family {name!r}; known families: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def family_of_variant(variant: str) -> Family | None:
    """The family a published control-module variant was made for (``None`` for an unpublished variant)."""
    for fam in _REGISTRY.values():
        if variant in fam.variants:
            return fam
    return None


def injection_point(name: str) -> InjectionPoint:
    """An injection point by name, from any registered family."""
    for fam in _REGISTRY.values():
        for p in fam.points:
            if p.name == name:
                return p
    known = sorted({p.name for fam in _REGISTRY.values() for p in fam.points})
    raise ValueError(f"Unknown injection point {name!r}; known points: {known}.")


def _denoiser_names() -> list[str]:
    """The pipeline components (and folder names) that hold a backbone, over the registered families."""
    return list(dict.fromkeys(f.denoiser for f in families()))


def _config_of(obj: Any) -> Mapping[str, Any] | None:
    """The denoiser config of a model or pipeline object, as a mapping with ``_class_name``; ``None`` otherwise."""
    for attr in _denoiser_names():
        inner = getattr(obj, attr, None)
        if inner is not None and hasattr(inner, "config"):
            obj = inner
            break
    config = getattr(obj, "config", None)
    if config is None or not hasattr(obj, "forward"):
        return None
    return {**dict(config), "_class_name": type(obj).__name__}


def _config_from_folder(folder: Path) -> Mapping[str, Any] | None:
    """The denoiser's config.json in a diffusers folder (a pipeline folder, or a unet/transformer folder itself)."""
    for sub in (*_denoiser_names(), "."):
        path = folder / sub / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
    return None


def _config_from_hub(repo_id: str) -> Mapping[str, Any] | None:
    """The denoiser's config from a hub repo (through the local cache; ``None`` when it cannot be had offline)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import HFValidationError
    except ImportError:
        return None
    for sub in _denoiser_names():
        try:
            path = hf_hub_download(repo_id, "config.json", subfolder=sub)
        except (OSError, ValueError, HFValidationError):
            continue
        return json.loads(Path(path).read_text())
    return None


def _checkpoint_keys(path: Path) -> list[str] | None:
    """The tensor names of a ``.safetensors`` file, read from its header alone (no tensor is loaded)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    except (OSError, ValueError):
        return None


def detect_family(obj: Any) -> Family:
    """The family of a denoiser (UNet/transformer), a pipeline, a config mapping, a model folder or a hub id.

    Raises ``ValueError`` naming the known families when nothing matches (or the config cannot be read).
    """
    if isinstance(obj, Mapping):
        config, what = obj, "this config"
    elif isinstance(obj, (str, Path)):
        what = repr(str(obj))
        path = Path(obj)
        config = _config_from_folder(path) if path.is_dir() else None
        if config is None and not path.exists():
            config = _config_from_hub(str(obj))
        if path.is_file() and path.suffix == ".safetensors":
            keys = _checkpoint_keys(path) or []
            for fam in families():
                if any(k.startswith(fam.checkpoint_keys) for k in keys) and fam.checkpoint_keys:
                    return fam
    else:
        config, what = _config_of(obj), f"this {type(obj).__name__}"
    if config is not None:
        for fam in families():
            if fam.matches(config):
                return fam
    known = ", ".join(f"{f.name} ({f.title})" for f in families())
    hint = "its denoiser config (unet/config.json) could not be read" if config is None else "nothing matched"
    raise ValueError(f"Could not tell which base-model family {what} is ({hint}); known families: {known}.")


# The published UNet configs (unet/config.json of the reference checkpoints, minus weights), for benchmarks and
# meta-device sizes.
_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
_SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def _is_unet2d(config: Mapping[str, Any]) -> bool:
    return config.get("_class_name") == "UNet2DConditionModel"


register_family(
    Family(
        name="sd15",
        title="Stable Diffusion 1.5",
        matches=lambda c: _is_unet2d(c) and c.get("addition_embed_type") != "text_time",
        points=UNET_POINTS,
        variants=("sd15", "sd15-training"),
        light_variant="sd15-training",
        default_variant="sd15-training",
        resolution=512,
        trainable_patterns=("to_out",),  # every attention output projection (published SD1.5 training)
        pipelines={
            "text2img": "StableDiffusionControlNeXtPipeline",
            "img2img": "StableDiffusionControlNeXtImg2ImgPipeline",
            "inpaint": "StableDiffusionControlNeXtInpaintPipeline",
        },
        pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
        checkpoint_keys=("cond_stage_model.",),
        published_config=_SD15_UNET,
    )
)
register_family(
    Family(
        name="sdxl",
        title="Stable Diffusion XL",
        matches=lambda c: _is_unet2d(c) and c.get("addition_embed_type") == "text_time",
        points=UNET_POINTS,
        variants=("sdxl",),
        light_variant="sdxl",
        default_variant="sdxl",
        resolution=1024,
        trainable_patterns=(".*attn2.*to_out.*",),  # cross-attention output projections (published SDXL training)
        pipelines={
            "text2img": "StableDiffusionXLControlNeXtPipeline",
            "img2img": "StableDiffusionXLControlNeXtImg2ImgPipeline",
            "inpaint": "StableDiffusionXLControlNeXtInpaintPipeline",
        },
        text_encoders=2,
        sdxl_text_conditioning=True,
        vae_fp32=True,
        checkpoint_keys=("conditioner.embedders.1.",),
        published_config=_SDXL_UNET,
    )
)
register_family(
    Family(
        name="svd",
        title="Stable Video Diffusion",
        matches=lambda c: str(c.get("_class_name", "")).startswith("UNetSpatioTemporal"),
        points=tuple(
            InjectionPoint(p.name, p.module, p.when, p.channels, p.description, p.hidden_kwarg, p.output_index, "video")
            for p in UNET_POINTS
        ),
        variants=("svd", "svd-v2"),
        light_variant="svd-v2",
        default_variant="svd-v2",
        resolution=576,
        trainable_patterns=(".*",),  # the SVD releases continue training the whole UNet
        pipelines={"video": "StableVideoDiffusionControlNeXtPipeline"},
        video=True,
    )
)


# ---------------------------------------------------------------------------------------------- transformers (DiT)
def _inner_dim(config: Any) -> int:
    return config.num_attention_heads * config.attention_head_dim


def _after_block(k: int, note: str) -> InjectionPoint:
    # SD3's JointTransformerBlock and Flux's double-stream block both return (encoder_hidden_states, hidden_states):
    # element 1 is the image stream; the text stream (element 0) is left as the block returned it.
    return InjectionPoint(
        f"after_block_{k}",
        f"transformer_blocks.{k}",
        "post",
        _inner_dim,
        f"on the image tokens returned by transformer block {k} ({note}); the text tokens stay un-controlled",
        output_index=1,
        layout="tokens",
    )


# Candidate points on the image stream of SD3's joint blocks and Flux's double-stream blocks. `after_block_0` is the
# default: in the tiny study (docs/dit.md) it learned control fastest (mean edge F1 over the run 0.431 +- 0.009
# against 0.358 +- 0.030 after block 4, 3 seeds; equal at the end), and after block 8 no control was learned.
DIT_POINTS = (
    _after_block(0, "default: the first block, the earliest point (measured best; the SDXL release injects first too)"),
    _after_block(4, "an early intermediate block of SD3 (24-38 blocks) and Flux (19 double-stream blocks)"),
    _after_block(8, "a deeper intermediate block"),
)


# The published transformer configs (transformer/config.json of the reference checkpoints, minus weights), for
# benchmarks and meta-device sizes: stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-dev.
_SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
_FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _flux_latent_grid(sample: torch.Tensor, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """Flux is called with 2x2-packed tokens (B, h/2 * w/2, 4C): the grid comes from the rotary ids (row, column)."""
    ids = kwargs.get("img_ids")
    if ids is None:
        raise ValueError("The Flux transformer must be called with img_ids= (keyword) for ControlNeXt control.")
    ids = ids.reshape(-1, ids.shape[-1])
    if ids.shape[0] == 0:  # FluxPipeline rounds sizes down to whole 16-pixel patches: below one, no token is left
        raise ValueError(
            "The Flux call has no image tokens: height and width must each be at least one patch (16 pixels for the "
            "published VAE); FluxPipeline rounds them down to multiples of 16."
        )
    rows, cols = (int(v) + 1 for v in ids[:, 1:3].amax(dim=0).tolist())  # one host read per call
    if rows * cols != sample.shape[1]:
        raise ValueError(
            f"The Flux img_ids describe a {rows}x{cols} token grid but hidden_states has {sample.shape[1]} tokens."
        )
    return 2 * rows, 2 * cols


def _is(class_name: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda c: c.get("_class_name") == class_name


register_family(
    Family(
        name="sd3",
        title="Stable Diffusion 3",
        matches=_is("SD3Transformer2DModel"),
        points=DIT_POINTS,
        variants=("sd3",),
        light_variant="sd3",
        default_variant="sd3",
        resolution=1024,
        # By analogy with the published SD1.5 recipe (attention output projections): the image stream's output
        # projections of the blocks after the injection point, the blocks that learn to use the control.
        trainable_patterns=(r"^transformer_blocks\.{after}\.attn\.to_out\.",),
        pipelines={
            "text2img": "StableDiffusion3ControlNeXtPipeline",
            "img2img": "StableDiffusion3ControlNeXtImg2ImgPipeline",
            "inpaint": "StableDiffusion3ControlNeXtInpaintPipeline",
        },
        denoiser="transformer",
        kind="transformer",
        call_args=("hidden_states", "timestep"),  # SD3 passes the scheduler's t in [0, 1000]
        text_encoders=3,
        latent_patch=2,
        published_config=_SD3_MEDIUM_TRANSFORMER,
        objective="flow_matching",
        objective_defaults={"precondition_outputs": True},  # train_controlnet_sd3.py's default
    )
)
register_family(
    Family(
        name="flux",
        title="Flux.1",
        matches=_is("FluxTransformer2DModel"),
        points=DIT_POINTS,
        variants=("flux",),
        light_variant="flux",
        default_variant="flux",
        resolution=1024,
        trainable_patterns=(r"^transformer_blocks\.{after}\.attn\.to_out\.",),
        pipelines={
            "text2img": "FluxControlNeXtPipeline",
            "img2img": "FluxControlNeXtImg2ImgPipeline",
            "inpaint": "FluxControlNeXtInpaintPipeline",
        },
        denoiser="transformer",
        kind="transformer",
        call_args=("hidden_states", "timestep"),
        text_encoders=2,
        timestep_scale=1000.0,  # Flux pipelines call the transformer with t / 1000
        latent_patch=2,
        cfg_batch=False,  # guidance-distilled; true CFG runs a second, separate transformer call
        latent_grid=_flux_latent_grid,
        published_config=_FLUX_DEV_TRANSFORMER,
        objective="flow_matching",
        objective_defaults={"precondition_outputs": False, "guidance_scale": 3.5},  # train_controlnet_flux.py's
    )
)
