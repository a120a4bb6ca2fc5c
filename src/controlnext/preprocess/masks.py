"""Binary masks and scribbles: white shapes/strokes on black, as mask- and scribble-conditioned models expect."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ._image import ImageInput, _as_pil, to_gray_array

__all__ = ["mask", "scribble"]


def _check_threshold(threshold: float) -> None:
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold must lie in [0, 255], got {threshold}.")


def _white_on_black(binary: np.ndarray) -> Image.Image:
    out = np.where(binary, 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(out[..., None], 3, axis=2))


def mask(image: ImageInput, threshold: float = 128, invert: bool = False, source: str = "auto") -> Image.Image:
    """A binary mask: pixels brighter than ``threshold`` become white (255), the rest black.

    ``source``: 'luma' thresholds brightness, 'alpha' thresholds the alpha channel (a cut-out PNG), 'auto' uses the
    alpha channel when the image has a non-opaque one and brightness otherwise. ``invert`` swaps white and black.
    """
    _check_threshold(threshold)
    if source not in ("auto", "luma", "alpha"):
        raise ValueError(f"mask source must be 'auto', 'luma' or 'alpha', got {source!r}.")
    pil = _as_pil(image)
    has_alpha = pil.mode in ("RGBA", "LA") or (pil.mode == "P" and "transparency" in pil.info)
    alpha = np.asarray(pil.convert("RGBA"))[..., 3] if has_alpha else None
    if source == "alpha" and alpha is None:
        raise ValueError("mask source 'alpha' needs an image with an alpha channel (e.g. a cut-out PNG).")
    if alpha is not None and (source == "alpha" or (source == "auto" and alpha.min() < 255)):
        values = alpha
    else:
        values = to_gray_array(pil)
    binary = values > threshold
    return _white_on_black(~binary if invert else binary)


def scribble(
    image: ImageInput,
    mode: str = "sketch",
    threshold: float = 128,
    thickness: int = 3,
    invert: bool | None = None,
) -> Image.Image:
    """Scribble condition: white strokes on black, thin strokes widened to ``thickness`` pixels (1 keeps them).

    ``mode='sketch'``: ``image`` is a drawing; strokes are the pixels on the ink side of ``threshold``. Dark ink on
    a light page is detected and flipped automatically (``invert=None``); pass ``invert`` to force it.
    ``mode='photo'``: strokes are derived from a photo's main edges (Canny with thresholds from the median
    brightness, then thickened), a quick stand-in for learned scribble extractors; ``invert`` is ignored.
    """
    _check_threshold(threshold)
    if thickness < 1 or thickness > 64:
        raise ValueError(f"scribble thickness must lie in [1, 64] pixels, got {thickness}.")
    gray = to_gray_array(image)
    if mode == "sketch":
        if invert is None:
            invert = float(np.median(gray)) > 127  # a light page: the ink is the dark part
        strokes = gray < threshold if invert else gray > threshold
    elif mode == "photo":
        med = float(np.median(gray))
        low, high = int(max(0, 0.66 * med)), int(min(255, 1.33 * med + 1))
        strokes = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), low, max(high, low + 1)) > 0
    else:
        raise ValueError(f"scribble mode must be 'sketch' or 'photo', got {mode!r}.")
    if thickness > 1:
        # Grow every stroke by (thickness - 1) / 2 px on each side, so 1 px pen lines reach ``thickness`` px.
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thickness, thickness))
        strokes = cv2.dilate(strokes.astype(np.uint8), kernel) > 0
    return _white_on_black(strokes)
