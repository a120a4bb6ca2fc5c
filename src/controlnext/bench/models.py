"""The models a benchmark row runs: random weights at the real architecture sizes, and the step inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..families import get_family
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


def build_unet(preset: Preset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base UNet of a preset with random weights (real architecture, or a tiny one for CI presets)."""
    from diffusers import UNet2DConditionModel

    from ..testing import tiny_unet

    def make() -> nn.Module:
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
        if preset.tiny:
            chans = unet.config.block_out_channels
            return tiny_controlnext(variant, out_channels=chans[-1] if variant == "sd15" else chans[0], **extra)
        return ControlNeXtModel.from_variant(variant, **extra)

    return build_random(make, device, dtype)


def build_controlnet(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """diffusers' ControlNet initialised from the UNet, as users create one to train."""
    from diffusers import ControlNetModel

    device = unet.device
    return build_random(lambda: ControlNetModel.from_unet(unet), device, dtype)


@dataclass
class _Inputs:
    latents: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor] | None
    condition: torch.Tensor  # (1, 3, H, W) in [0, 1]
    timesteps: torch.Tensor


def make_inputs(unet: nn.Module, resolution: int, batch: int, dtype: torch.dtype, seed: int) -> _Inputs:
    """Random latents, text embeddings (and SDXL's added conditions), one condition image and the timesteps."""
    device = unet.device
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    lat = resolution // 8
    cfg = unet.config
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype)
        added = {"text_embeds": randn(batch, pooled), "time_ids": ids.to(device)}
    condition = randn(1, 3, resolution, resolution)
    if device.type != "meta":
        condition = torch.rand(1, 3, resolution, resolution, generator=g).to(device=device, dtype=dtype)
    timesteps = torch.linspace(999, 1, SCHEDULE_STEPS).round().long().to(device)
    return _Inputs(
        latents=randn(batch, cfg.in_channels, lat, lat),
        text=randn(batch, TEXT_TOKENS, cfg.cross_attention_dim),
        added=added,
        condition=condition,
        timesteps=timesteps,
    )


# ---------------------------------------------------------------------------------------------- rows
