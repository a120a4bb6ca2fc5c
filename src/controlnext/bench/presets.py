"""The benchmark's named settings and model configs (plain data: importing this module loads no torch).

Kept apart from :mod:`controlnext.bench` so that the command line can list presets without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_ROWS",
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

SCHEDULE_STEPS = 50  # timesteps cycle through a 50-step schedule (the cost does not depend on the value)
TEXT_TOKENS = 77


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
    )
}
