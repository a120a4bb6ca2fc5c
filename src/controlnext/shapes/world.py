"""Procedural "shapes" world: one coloured shape on a plain background, with a caption and derived conditions.

Every sample is a deterministic function of ``(seed, index)`` (its own ``numpy`` generator), so any subset can be
regenerated exactly, in any order and in parallel. A sample is:

* ``image``: (S, S, 3) uint8 RGB, one filled shape (circle, square, triangle, star or cross; random size, position
  and rotation) on a solid background, drawn anti-aliased at 4x and downsampled; small per-image colour jitter;
* ``mask``: (S, S) uint8 in {0, 255}, the shape's silhouette (the supersampled coverage thresholded at one half);
* ``edges``: (S, S) uint8 in {0, 255}, :func:`canny_edges` of ``image`` (the same detector the fidelity metric applies
  to generated images);
* ``caption``: ``"a {colour} {shape} on a {background} background"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "VOCABULARY",
    "ShapeSample",
    "canny_edges",
    "caption_for",
    "condition_image",
    "render_batch",
    "render_sample",
]

#: Named colours (RGB, 0-255). Shape and background colours are drawn from this palette and always differ.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
BACKGROUND = "background"
#: Every word a caption can contain (make them single tokens of the text encoder's tokenizer).
VOCABULARY: list[str] = ["a", "on", BACKGROUND, *COLOURS, *SHAPES]

_SUPERSAMPLE = 4
_JITTER = 12  # max per-channel colour jitter (0-255) so colours are not exactly discrete


@dataclass
class ShapeSample:
    """One rendered sample; see the module docstring for the arrays' meaning."""

    image: np.ndarray
    mask: np.ndarray
    edges: np.ndarray
    caption: str
    meta: dict = field(default_factory=dict)


def caption_for(colour: str, shape: str, background: str) -> str:
    """The caption template shared by the dataset, the base model's training and the demo."""
    return f"a {colour} {shape} on a {background} {BACKGROUND}"


def canny_edges(image: np.ndarray, low: int = 50, high: int = 150) -> np.ndarray:
    """Canny edges of an RGB uint8 image: per-channel ``cv2.Canny`` (thresholds ``low``/``high``), OR-ed.

    Per channel rather than on grey, so that a shape and background of equal luminance still give an edge.
    Returns (H, W) uint8 in {0, 255}.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"canny_edges expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}.")
    out = np.zeros(image.shape[:2], np.uint8)
    for c in range(3):
        out |= cv2.Canny(np.ascontiguousarray(image[..., c]), low, high)
    return out


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if shape == "square":
        pts = [
            (math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
        pts = [(x * r * 0.85, y * r * 0.85) for x, y in pts]  # same visual area as the other shapes of radius r
    elif shape == "triangle":
        pts = [
            (
                r * math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3),
                r * math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3),
            )
            for k in range(3)
        ]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = angle - math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33 * r
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in base]
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    return np.array([(cx + x, cy + y) for x, y in pts])


def _coverage(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape, drawn at 4x and area-downsampled."""
    big = size * _SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    s = _SUPERSAMPLE
    if shape == "circle":
        cv2.circle(canvas, (round(cx * s), round(cy * s)), round(r * s * 0.9), 255, -1, cv2.LINE_AA)
    else:
        pts = np.round(_polygon(shape, cx, cy, r, angle) * s).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + rng.integers(-_JITTER, _JITTER + 1, 3), 0, 255)


def render_sample(seed: int, index: int, size: int = 64) -> ShapeSample:
    """Render sample ``index`` of the dataset with ``seed`` (pure function of its arguments)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}.")
    rng = np.random.default_rng([int(seed), int(index)])
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = names[rng.integers(len(names))]
    others = [n for n in names if n != colour]
    background = others[rng.integers(len(others))]
    r = size * rng.uniform(0.16, 0.36)
    margin = r * 0.9
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = rng.uniform(0, 2 * math.pi)
    cov = _coverage(shape, cx, cy, r, angle, size)[..., None]
    fg, bg = _jitter(rng, COLOURS[colour]), _jitter(rng, COLOURS[background])
    image = np.round(cov * fg + (1 - cov) * bg).astype(np.uint8)
    mask = np.where(cov[..., 0] >= 0.5, 255, 0).astype(np.uint8)
    meta = dict(shape=shape, colour=colour, background=background, cx=cx, cy=cy, radius=r, angle=angle)
    return ShapeSample(image, mask, canny_edges(image), caption_for(colour, shape, background), meta)


def condition_image(sample: ShapeSample, condition: str) -> np.ndarray:
    """The (H, W, 3) uint8 condition image of ``sample`` for ``condition`` ('edges' or 'mask'): white on black."""
    if condition not in ("edges", "mask"):
        raise ValueError(f"condition must be 'edges' or 'mask', got {condition!r}.")
    plane = sample.edges if condition == "edges" else sample.mask
    return np.repeat(plane[..., None], 3, axis=2)


def render_batch(seed: int, start: int, count: int, size: int = 64) -> list[ShapeSample]:
    """Samples ``start .. start+count-1`` of the dataset with ``seed``."""
    return [render_sample(seed, i, size) for i in range(start, start + count)]
