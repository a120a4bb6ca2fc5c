"""Offline test fixtures: tiny randomly initialised models with the real diffusers layouts, a tiny base-model folder,
and small synthetic datasets (images with masks; video with poses). Nothing here downloads anything.

They exercise exactly the code paths real checkpoints use (same classes, same folder layout), only small; the tests,
the CI benchmark presets and the offline demos use them.
"""

from .data import COLOURS, SHAPES, write_shapes_dataset, write_tiny_base
from .models import (
    TINY_CONTROLNEXT,
    TINY_CONTROLNEXT_DIT,
    TINY_CONTROLNEXT_SD15,
    TINY_CONTROLNEXT_SVD,
    tiny_clip,
    tiny_controlnext,
    tiny_pipeline_components,
    tiny_sizes,
    tiny_svd_components,
    tiny_unet,
    tiny_vae,
    write_tiny_clip_tokenizer,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "TINY_CONTROLNEXT",
    "TINY_CONTROLNEXT_SD15",
    "TINY_CONTROLNEXT_DIT",
    "TINY_CONTROLNEXT_SVD",
    "make_synthetic_video_dataset",
    "tiny_clip",
    "tiny_controlnext",
    "tiny_pipeline_components",
    "tiny_sizes",
    "tiny_svd_components",
    "tiny_unet",
    "tiny_vae",
    "write_shapes_dataset",
    "write_tiny_base",
    "write_tiny_clip_tokenizer",
]


def __getattr__(name: str):
    # The video fixture needs the video extra (imageio); import it only when asked for.
    if name == "make_synthetic_video_dataset":
        from .video import make_synthetic_video_dataset

        return make_synthetic_video_dataset
    raise AttributeError(f"module 'controlnext.testing' has no attribute {name!r}")
