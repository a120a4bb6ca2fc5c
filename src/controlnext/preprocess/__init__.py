"""Preprocessors that turn user images into control conditions (RGB PIL images, white/colour on black).

``canny``, ``mask``, ``scribble``, ``segment`` need nothing but OpenCV. ``pose`` draws OpenPose keypoints, or
detects them with DWPose when its two ONNX files are present locally. ``depth`` runs a local transformers depth
model, or converts an uploaded depth map. Nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ._image import ImageInput, fit_to_size, open_image, to_pil, to_rgb_array
from .canny import canny
from .depth import check_depth_model, depth, depth_from_map
from .masks import mask, scribble
from .pose import DWPOSE_FILES, PoseKeypoints, detect_pose, draw_pose, find_dwpose_files, load_openpose_json, pose
from .registry import REGISTRY, Option, Preprocessor, get_preprocessor
from .segment import palette, segment

__all__ = [
    "PREPROCESSORS",
    "REGISTRY",
    "Option",
    "Preprocessor",
    "get_preprocessor",
    "DWPOSE_FILES",
    "ImageInput",
    "PoseKeypoints",
    "canny",
    "check_depth_model",
    "depth",
    "depth_from_map",
    "detect_pose",
    "draw_pose",
    "find_dwpose_files",
    "fit_to_size",
    "load_openpose_json",
    "mask",
    "open_image",
    "palette",
    "pose",
    "preprocess",
    "scribble",
    "segment",
    "to_pil",
    "to_rgb_array",
]


# Name -> function(image, **options) -> RGB PIL image ("none" passes a ready-made condition through); the options of
# each are declared in :data:`REGISTRY`.
PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {name: p.fn for name, p in REGISTRY.items()}


def preprocess(name: str, image: ImageInput, **options) -> Image.Image:
    """Run the preprocessor ``name`` on ``image`` with its keyword options (checked against :data:`REGISTRY`)."""
    return get_preprocessor(name).run(image, options)
