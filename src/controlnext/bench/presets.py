"""The benchmark's named settings and model configs (plain data: importing this module loads no torch).

Kept apart from :mod:`controlnext.bench` so that the command line can list presets without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ROWS",
    "DIT_ROWS",
    "PRESETS",
    "ROW_NAMES",
    "SCHEDULE_STEPS",
    "TEXT_TOKENS",
    "Preset",
]

ROW_NAMES = (
    "base", "controlnext", "controlnext-sd15-release", "controlnet", "controlnext-plain", "controlnext-timestep-free"
)  # fmt: skip
# `controlnext-plain`: the same module computed the release's way (whole encoder every step, the condition duplicated
# for the guidance halves), to measure what the cached prefix and the de-duplication save. Opt-in except in CI.
# `controlnext-timestep-free`: the module without timestep input (`use_timestep=False`), its whole output computed
# once per generation, so each step pays only Cross Normalization. Opt-in.
DEFAULT_ROWS = ROW_NAMES[:4]

DIT_ROWS = ("base", "controlnext", "controlnet")

SCHEDULE_STEPS = 50  # timesteps cycle through a 50-step schedule (the cost does not depend on the value)
TEXT_TOKENS = 77
# Text tokens of a transformer call as the stock pipelines make them: SD3 77 CLIP + 256 T5 (its
# max_sequence_length), Flux 512 T5 (FluxPipeline's max_sequence_length).
SD3_TEXT_TOKENS = 77 + 256
FLUX_TEXT_TOKENS = 512

# diffusers' ControlNets for the transformer families at the layer counts of the community checkpoints people use
# (their config.json): InstantX/SD3-Controlnet-Canny (SD3-medium), and InstantX/FLUX.1-dev-Controlnet-Union (5 double-
# and 10 single-stream blocks, 10 control modes; the Shakker-Labs Union-Pro continues it).
SD3_CONTROLNET = (("num_layers", 6),)
# SD3.5-large (stabilityai/stable-diffusion-3.5-large transformer/config.json: 38 joint blocks, 38 heads x 64, RMS
# query-key norm) on top of SD3-medium's config, and Stability AI's SD3.5-large ControlNets (canny, depth, blur): 19
# layers without a text stream, sharing the transformer's patch embedding, as diffusers'
# scripts/convert_sd3_controlnet_to_diffusers.py builds them.
SD35_LARGE = (
    ("num_layers", 38), ("num_attention_heads", 38), ("caption_projection_dim", 2432), ("qk_norm", "rms_norm"),
)  # fmt: skip
SD35_CONTROLNET = (
    ("num_layers", 19), ("joint_attention_dim", None), ("caption_projection_dim", 2048), ("pos_embed_max_size", None),
    ("pos_embed_type", None), ("use_pos_embed", False), ("force_zeros_for_pooled_projection", False), ("qk_norm", None),
)  # fmt: skip
FLUX_CONTROLNET = (("num_layers", 5), ("num_single_layers", 10), ("num_mode", 10))


@dataclass(frozen=True)
class Preset:
    """A named benchmark setting: model family and size, rows, and default repeats."""

    name: str
    family: str  # a family name (controlnext.families)
    resolution: int  # pixels (the latent is 1/8)
    rows: tuple[str, ...]
    tiny: bool = False  # tiny random models from controlnext.testing.models (CI), else the real architectures
    repeats: int = 5
    steps: int = 1
    description: str = ""
    text_tokens: int = TEXT_TOKENS
    # Transformer presets: overrides of the family's published config (a CPU-sized depth), and the diffusers
    # ControlNet's config (its layer counts) on top of the base's.
    base_config: tuple[tuple[str, Any], ...] = ()
    controlnet_config: tuple[tuple[str, Any], ...] = ()


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
        Preset("ci", "sd15", 64, ROW_NAMES[:5], tiny=True, repeats=2, steps=2, description="tiny SD1.5-layout models"),
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
        Preset(
            "sd3-1024",
            "sd3",
            1024,
            DIT_ROWS,
            repeats=3,
            text_tokens=SD3_TEXT_TOKENS,
            controlnet_config=SD3_CONTROLNET,
            description="SD3-medium transformer (2B; ControlNet: 6 layers, as InstantX/SD3-Controlnet-Canny)",
        ),
        Preset(
            "sd35-large-1024",
            "sd3",
            1024,
            DIT_ROWS,
            repeats=3,
            text_tokens=SD3_TEXT_TOKENS,
            base_config=SD35_LARGE,
            controlnet_config=SD35_CONTROLNET,
            description="SD3.5-large transformer (8.1B; ControlNet: 19 layers, as Stability AI's SD3.5-large "
            "ControlNets)",
        ),
        Preset(
            "sd3-512",
            "sd3",
            512,
            DIT_ROWS,
            repeats=3,
            text_tokens=SD3_TEXT_TOKENS,
            controlnet_config=SD3_CONTROLNET,
            description="SD3-medium transformer (2B; ControlNet: 6 layers), CPU-sized",
        ),
        Preset(
            "flux-1024",
            "flux",
            1024,
            DIT_ROWS,
            repeats=3,
            text_tokens=FLUX_TEXT_TOKENS,
            controlnet_config=FLUX_CONTROLNET,
            description="Flux.1-dev transformer (12B; ControlNet: 5 double + 10 single blocks, as "
            "InstantX/FLUX.1-dev-Controlnet-Union)",
        ),
        Preset(
            "flux-512-shallow",
            "flux",
            512,
            DIT_ROWS,
            repeats=3,
            text_tokens=FLUX_TEXT_TOKENS,
            # Every depth divided by 3.8 (19 -> 5 double, 38 -> 10 single; the ControlNet's 5 + 10 -> 1 + 3, rounded),
            # so the rows keep about their full-size proportions while the base fits a CPU's memory and time; 5
            # double blocks keep the default injection point (after block 4).
            base_config=(("num_layers", 5), ("num_single_layers", 10)),
            controlnet_config=(("num_layers", 1), ("num_single_layers", 3), ("num_mode", 10)),
            description="Flux.1-dev width, 5 of 19 double + 10 of 38 single blocks (ControlNet 1 + 3 of its 5 + 10), "
            "CPU-sized",
        ),
        Preset(
            "ci-sd3",
            "sd3",
            64,
            DIT_ROWS,
            tiny=True,
            repeats=2,
            steps=2,
            text_tokens=7,
            controlnet_config=(("num_layers", 2),),
            description="tiny SD3-layout models",
        ),
        Preset(
            "ci-flux",
            "flux",
            64,
            DIT_ROWS,
            tiny=True,
            repeats=2,
            steps=2,
            text_tokens=7,
            controlnet_config=(("num_layers", 1), ("num_single_layers", 1), ("num_mode", 10)),
            description="tiny Flux-layout models",
        ),
    )
}
