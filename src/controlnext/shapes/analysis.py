"""Read back what a shapes-world image shows: background colour, shape colour and shape kind.

Used to measure whether a text-to-image model draws what its caption asks for (the base model's model card). The
readers are simple and deterministic, and their own accuracy on ground-truth renders is measured by the tests:

* colours: nearest palette colour (Euclidean RGB) of the border median (background) and of the foreground median;
* shape: from the largest foreground contour: solidity (area / convex-hull area), the vertex count of its convex
  hull simplified with ``cv2.approxPolyDP`` (4 % of the perimeter) and circularity 4 pi A / P^2.
"""

from __future__ import annotations

import cv2
import numpy as np

from .metrics import foreground_mask, to_uint8_rgb
from .world import COLOURS

__all__ = ["classify_shape", "describe", "nearest_colour"]

_PALETTE = np.array(list(COLOURS.values()), float)
_NAMES = list(COLOURS)


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest to ``rgb`` (0-255)."""
    d = ((_PALETTE - np.asarray(rgb, float)) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


def classify_shape(mask: np.ndarray) -> str | None:
    """'circle', 'square', 'triangle', 'star' or 'cross' for a bool mask of one shape; None when there is none."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(c)
    if area < 12:
        return None
    hull = cv2.convexHull(c)
    solidity = area / max(cv2.contourArea(hull), 1e-6)
    if solidity < 0.82:
        # Star (5 spikes, about 0.55 solid) vs cross (4 arms, about 0.7).
        return "star" if solidity < 0.64 else "cross"
    perim = cv2.arcLength(hull, True)
    circularity = 4 * np.pi * cv2.contourArea(hull) / max(perim**2, 1e-6)
    vertices = len(cv2.approxPolyDP(hull, 0.04 * perim, True))
    if vertices == 3 or circularity < 0.7:
        return "triangle"
    if circularity > 0.88:
        return "circle"
    return "square"


def describe(image) -> tuple[str, str | None, str]:
    """(shape colour, shape kind or None, background colour) read from a generated image."""
    arr = to_uint8_rgb(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = nearest_colour(np.median(border, axis=0))
    fg = foreground_mask(arr)
    colour = nearest_colour(np.median(arr[fg], axis=0)) if fg.any() else background
    return colour, classify_shape(fg), background
