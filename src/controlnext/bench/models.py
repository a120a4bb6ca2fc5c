"""The models a benchmark row runs: random weights at the real architecture sizes, and the step inputs.

UNet families (SD1.5, SDXL) and transformer families (SD3, Flux) alike: the base denoiser, the ControlNeXt module
of the family, diffusers' ControlNet for it, and the inputs of one denoising call as the stock pipelines make them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..families import Family, detect_family, get_family
from ..models.controlnext import ControlNeXtModel
from .presets import SCHEDULE_STEPS, TEXT_TOKENS, Preset


def build_random(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``factory()``'s model with random weights, created in ``dtype`` on ``device``, frozen and in eval mode."""
    # Random init straight in the target dtype and on the device: no full-size float32 copy on the host first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _is_transformer(family: str | Family) -> bool:
    return get_family(family).denoiser == "transformer"


def _transformer_class(family: str) -> type:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[get_family(family).name]


def build_unet(preset: Preset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base denoiser of a preset with random weights: the UNet, or the transformer of the SD3 and Flux presets
    (the published config with the preset's ``base_config`` on top; a tiny one for CI presets)."""
    from diffusers import UNet2DConditionModel

    from ..testing import tiny_unet
    from ..testing.models import tiny_transformer

    def make() -> nn.Module:
        if _is_transformer(preset.family):
            if preset.tiny:
                return tiny_transformer(preset.family)
            config = {**get_family(preset.family).published_config, **dict(preset.base_config)}
            return _transformer_class(preset.family)(**config)
        if preset.tiny:
            return tiny_unet(preset.family)
        return UNet2DConditionModel(**get_family(preset.family).published_config)

    return build_random(make, device, dtype)


def build_controlnext(preset: Preset, row: str, unet: nn.Module, dtype: torch.dtype) -> ControlNeXtModel:
    """The ControlNeXt module of a row: the family's 3.5M layout, or the SD1.5 release layout."""
    from ..testing import tiny_controlnext

    variant = "sd15" if row == "controlnext-sd15-release" else get_family(preset.family).light_variant  # also -plain
    device = unet.device

    def make() -> nn.Module:
        extra = {"use_timestep": False} if row == "controlnext-timestep-free" else {}
        if _is_transformer(preset.family):  # the token layout, at the transformer's width
            width = unet.config.num_attention_heads * unet.config.attention_head_dim
            if preset.tiny:
                return tiny_controlnext(variant, out_channels=width, **extra)
            return ControlNeXtModel.from_variant(variant, out_channels=width, **extra)
        if preset.tiny:
            chans = unet.config.block_out_channels
            return tiny_controlnext(variant, out_channels=chans[-1] if variant == "sd15" else chans[0], **extra)
        return ControlNeXtModel.from_variant(variant, **extra)

    return build_random(make, device, dtype)


def build_controlnet(unet: nn.Module, dtype: torch.dtype, preset: Preset | None = None) -> nn.Module:
    """diffusers' ControlNet initialised from the UNet, as users create one to train.

    For a transformer (SD3, Flux) it is ``SD3ControlNetModel`` / ``FluxControlNetModel`` with the transformer's
    widths and the preset's ``controlnet_config`` (the layer counts of the community checkpoints), random weights.
    """
    from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel

    device = unet.device
    family = detect_family(unet)
    if _is_transformer(family):
        if preset is None:
            raise ValueError("A transformer's ControlNet needs the preset that names its layer counts.")
        cls = {"sd3": SD3ControlNetModel, "flux": FluxControlNetModel}[family.name]
        accepted = set(inspect.signature(cls.__init__).parameters)
        config = {k: v for k, v in dict(unet.config).items() if k in accepted}
        config.update(preset.controlnet_config)

        def make() -> nn.Module:
            net = cls(**config)
            if config.get("use_pos_embed", True) is False:  # SD3.5's ControlNets: the pipeline gives them this copy
                net.pos_embed = net._get_pos_embed_from_transformer(unet)
            return net

        return build_random(make, device, dtype)
    return build_random(lambda: ControlNetModel.from_unet(unet), device, dtype)


@dataclass
class _Inputs:
    latents: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor] | None
    condition: torch.Tensor  # (1, 3, H, W) in [0, 1]
    timesteps: torch.Tensor
    # Transformers: the call's other keyword arguments, what the transformer's timestep argument is (the scheduler's
    # t divided by the family's timestep_scale: Flux takes t / 1000), and diffusers ControlNet's condition (the
    # VAE latents of the control image, encoded once per generation by its pipeline: not part of a step).
    extra: dict[str, Any] = field(default_factory=dict)
    timestep_divisor: float = 1.0
    control_latents: torch.Tensor | None = None
    transformer: bool = False

    def call(self, t: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """The denoiser's (args, kwargs) at scheduler timestep ``t``, as the stock pipelines call it."""
        if not self.transformer:
            kw = {"added_cond_kwargs": self.added} if self.added is not None else {}
            return (self.latents, t), {"encoder_hidden_states": self.text, **kw}
        timestep = (t / self.timestep_divisor).to(self.timesteps.dtype).expand(self.latents.shape[0])
        kw = {"hidden_states": self.latents, "timestep": timestep, "encoder_hidden_states": self.text}
        return (), {**kw, **self.extra}


def make_inputs(
    unet: nn.Module, resolution: int, batch: int, dtype: torch.dtype, seed: int, text_tokens: int | None = None
) -> _Inputs:
    """Random latents, text embeddings (and SDXL's added conditions), one condition image and the timesteps.

    For a transformer: SD3's (B, 16, h, w) latents and pooled CLIP projections; Flux's 2x2-packed latent tokens,
    pooled projection, guidance value and rotary ids; and the ControlNet's condition latents in the same layout.
    """
    device = unet.device
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def image() -> torch.Tensor:  # the condition, in [0, 1] (drawn after a normal draw, as it always was)
        condition = randn(1, 3, resolution, resolution)
        if device.type != "meta":
            condition = torch.rand(1, 3, resolution, resolution, generator=g).to(device=device, dtype=dtype)
        return condition

    lat = resolution // 8
    cfg = unet.config
    family = detect_family(unet)
    if _is_transformer(family):
        return _transformer_inputs(unet, family, lat, batch, randn, image(), text_tokens or TEXT_TOKENS)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype)
        added = {"text_embeds": randn(batch, pooled), "time_ids": ids.to(device)}
    condition = image()
    timesteps = torch.linspace(999, 1, SCHEDULE_STEPS).round().long().to(device)
    return _Inputs(
        latents=randn(batch, cfg.in_channels, lat, lat),
        text=randn(batch, text_tokens or TEXT_TOKENS, cfg.cross_attention_dim),
        added=added,
        condition=condition,
        timesteps=timesteps,
    )


def _transformer_inputs(
    model: nn.Module, family: Family, lat: int, batch: int, randn: Callable[..., torch.Tensor],
    condition: torch.Tensor, tokens: int,
) -> _Inputs:  # fmt: skip
    cfg = model.config
    device = condition.device
    extra: dict[str, Any] = {"pooled_projections": randn(batch, cfg.pooled_projection_dim)}
    if family.name == "flux":
        from diffusers import FluxPipeline

        side = lat // 2  # 2x2 packing: (B, (h/2)(w/2), 4 * 16)
        latents, control = randn(batch, side * side, cfg.in_channels), randn(1, side * side, cfg.in_channels)
        extra["guidance"] = torch.full((batch,), 3.5, device=device, dtype=latents.dtype)
        extra["txt_ids"] = torch.zeros(tokens, 3, device=device, dtype=latents.dtype)
        extra["img_ids"] = FluxPipeline._prepare_latent_image_ids(batch, side, side, device, latents.dtype)
        timestep_dtype = latents.dtype  # FluxPipeline casts t to the latents' dtype
    else:
        latents, control = randn(batch, cfg.in_channels, lat, lat), randn(1, cfg.in_channels, lat, lat)
        timestep_dtype = torch.float32
    return _Inputs(
        latents=latents,
        text=randn(batch, tokens, cfg.joint_attention_dim),
        added=None,
        condition=condition,
        # Flow matching: the scheduler's t = 1000 * sigma, from 1000 down (the cost does not depend on the value).
        timesteps=torch.linspace(1000, 20, SCHEDULE_STEPS, dtype=timestep_dtype, device=device),
        extra=extra,
        timestep_divisor=family.timestep_scale,
        control_latents=control,
        transformer=True,
    )


# ---------------------------------------------------------------------------------------------- rows
