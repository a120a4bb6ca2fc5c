"""Depth conditions: estimated by a local transformers depth model, or taken from an uploaded depth map.

Output convention (that of MiDaS/DPT-style depth conditions): near is bright, far is dark, grey RGB uint8.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ._image import ImageInput, _as_pil, _minmax_u8, to_pil

__all__ = ["depth", "depth_from_map", "check_depth_model", "DEPTH_MODEL_FILES"]

DEPTH_MODEL_FILES = ("config.json", "preprocessor_config.json", "model.safetensors or pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def depth_from_map(image: ImageInput, invert: bool = False, normalize: bool = True) -> Image.Image:
    """Turn an uploaded depth map (8/16-bit grey or RGB, any range) into a depth condition.

    ``normalize`` stretches the map's own range to 0..255 (16-bit maps keep their precision until then);
    ``invert`` flips it, for maps that store distance (far = bright) rather than the near = bright convention.
    """
    pil = _as_pil(image)
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(pil).astype(np.float64)
    else:
        values = np.asarray(pil.convert("L")).astype(np.float64)
    if normalize:
        gray = _minmax_u8(values)
    else:
        scale = 65535.0 if pil.mode.startswith("I;16") else (255.0 if values.max() <= 255 else float(values.max()))
        gray = np.clip(values / scale * 255.0, 0, 255).round().astype(np.uint8)
    if invert:
        gray = 255 - gray
    return _gray_to_rgb(gray)


def check_depth_model(model: str | Path | None, allow_download: bool = False) -> str:
    """Validate a depth model reference and return what to hand to transformers.

    ``model`` is a local folder holding a transformers depth-estimation model (e.g. a saved copy of a DPT or
    Depth Anything model) or, only with ``allow_download=True``, a hub id.
    """
    if model is None or str(model).strip() == "":
        raise FileNotFoundError(
            "Depth estimation needs a local depth model folder (transformers format: "
            f"{', '.join(DEPTH_MODEL_FILES)}); pass it with --depth-model DIR, or upload a depth map instead."
        )
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if missing or not has_weights:
            what = missing + ([] if has_weights else ["model weights (*.safetensors or *.bin)"])
            raise FileNotFoundError(f"Depth model folder {path} is missing: {', '.join(what)}.")
        return str(path)
    if allow_download and _HUB_ID.match(str(model)):
        return str(model)
    hint = " (hub ids are used only when downloads are allowed)" if _HUB_ID.match(str(model)) else ""
    raise FileNotFoundError(f"Depth model folder not found: {model}{hint}.")


@lru_cache(maxsize=2)
def _depth_pipeline(model: str):
    # A folder path loads from disk only; a hub id reaches here only when downloads were allowed.
    from transformers import pipeline

    return pipeline("depth-estimation", model=model, device="cpu")


def depth(image: ImageInput, model: str | Path | None = None, invert: bool = False, allow_download: bool = False):
    """Estimate a depth condition for ``image`` with a transformers depth-estimation model (local by default).

    The model's prediction (relative inverse depth for DPT / Depth Anything) is brought to the input's size
    (bicubic) and min-max normalised to 0..255.
    """
    ref = check_depth_model(model, allow_download)
    pil = to_pil(image)
    estimator = _depth_pipeline(ref)
    predicted = estimator(pil)["predicted_depth"]
    values = predicted.squeeze().float().cpu().numpy()
    if values.shape != (pil.height, pil.width):  # recent transformers already resize to the input size
        values = cv2.resize(values, pil.size, interpolation=cv2.INTER_CUBIC)
    gray = _minmax_u8(values.astype(np.float64))
    return _gray_to_rgb(255 - gray if invert else gray)
