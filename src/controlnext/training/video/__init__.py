"""Training for the pose-guided video models (SVD + ControlNeXt): data layout, EDM schedule, loop, command line.

Run with ``python -m controlnext.training.video --model SVD --dataset DATA ...`` (or under
``accelerate launch -m controlnext.training.video``); see docs/video.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import VideoTrainConfig, add_video_train_arguments, video_config_from_args

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .data import StepBatchSampler, VideoPoseDataset, find_clips
    from .edm import edm_loss, edm_scalings, sample_sigmas
    from .loop import VideoTrainResult, train_video

# Imported on first use: `controlnext --help` reads the arguments from .config without loading torch or diffusers.
_LAZY = {
    "StepBatchSampler": ".data",
    "VideoPoseDataset": ".data",
    "find_clips": ".data",
    "edm_loss": ".edm",
    "edm_scalings": ".edm",
    "sample_sigmas": ".edm",
    "train_video": ".loop",
    "VideoTrainResult": ".loop",
}

__all__ = [
    "StepBatchSampler",
    "VideoPoseDataset",
    "VideoTrainConfig",
    "VideoTrainResult",
    "add_video_train_arguments",
    "edm_loss",
    "edm_scalings",
    "find_clips",
    "main",
    "sample_sigmas",
    "train_video",
    "video_config_from_args",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    if name == "main":
        return import_module(".__main__", __name__).main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
