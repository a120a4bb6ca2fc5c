"""Training of ControlNeXt control modules (and the published UNet subset) for SD1.5 and SDXL, on accelerate.

Entry points: ``controlnext train ...``, ``accelerate launch -m controlnext.train ...``, or :func:`train` with a
:class:`TrainConfig`. See docs/training.md. Heavy imports (diffusers, accelerate) happen on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import TrainConfig, add_train_arguments, config_from_args, parse_train_args

__all__ = [
    "ControlledBackbone",
    "TrainConfig",
    "TrainResult",
    "add_train_arguments",
    "config_from_args",
    "parse_train_args",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "train"):
        return getattr(import_module(".loop", __name__), name)
    if name == "ControlledBackbone":
        return getattr(import_module(".core", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
