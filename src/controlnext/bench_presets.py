"""The benchmark's named settings and model configs (plain data: importing this module loads no torch).

Kept apart from :mod:`controlnext.bench` so that the command line can list presets without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ROWS",
    "PRESETS",
    "ROW_NAMES",
    "SCHEDULE_STEPS",
    "SD15_UNET",
    "SDXL_UNET",
    "TEXT_TOKENS",
    "Preset",
]

ROW_NAMES = ("base", "controlnext", "controlnext-sd15-release", "controlnet", "controlnext-plain")
# `controlnext-plain`: the same module computed the release's way (whole encoder every step, the condition duplicated
# for the guidance halves), to measure what the cached prefix and the de-duplication save. Opt-in except in CI.
DEFAULT_ROWS = ROW_NAMES[:4]

# The SD1.5 and SDXL UNet configs (the published model_index configs, minus weights).
SD15_UNET: dict[str, Any] = dict(
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
SDXL_UNET: dict[str, Any] = dict(
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
SCHEDULE_STEPS = 50  # timesteps cycle through a 50-step schedule (the cost does not depend on the value)
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Preset:
    """A named benchmark setting: model family and size, rows, and default repeats."""

    name: str
    family: str  # "sd15" | "sdxl"
    resolution: int  # pixels (the latent is 1/8)
    rows: tuple[str, ...]
    tiny: bool = False  # tiny random models from controlnext.tiny (CI), else the real architectures
    repeats: int = 5
    steps: int = 1
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd15-512", "sd15", 512, DEFAULT_ROWS, description="SD1.5 UNet (860M)"),
        Preset(
            "sdxl-1024",
            "sdxl",
            1024,
            ("base", "controlnext", "controlnet"),
            description="SDXL UNet (2.6B)",
        ),
        Preset(
            "sdxl-512",
            "sdxl",
            512,
            ("base", "controlnext", "controlnet"),
            description="SDXL UNet (2.6B), CPU-sized",
        ),
        Preset("ci", "sd15", 64, ROW_NAMES, tiny=True, repeats=2, steps=2, description="tiny SD1.5-layout models"),
        Preset(
            "ci-sdxl",
            "sdxl",
            64,
            ("base", "controlnext", "controlnet", "controlnext-plain"),
            tiny=True,
            repeats=2,
            steps=2,
            description="tiny SDXL-layout models",
        ),
    )
}
