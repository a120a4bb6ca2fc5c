"""Colour-segmentation maps: flat-coloured regions, the input format of segmentation-conditioned models.

Without a semantic segmenter the regions come from colour clustering (k-means in CIE Lab after edge-preserving
smoothing): good enough to turn a photo or a rough colour sketch into a clean layout map. An uploaded map
(``source='map'``) keeps its own colours and only loses anti-aliasing and compression noise.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
from PIL import Image

from ._image import ImageInput, to_rgb_array

__all__ = ["segment", "palette", "MAX_SEGMENTS"]

MAX_SEGMENTS = 64


def palette(n: int) -> np.ndarray:
    """``n`` well-separated RGB colours (uint8, (n, 3)); deterministic, hues stepped by the golden angle."""
    out = []
    for i in range(n):
        hue = (i * 0.61803398875) % 1.0
        sat = 0.85 if i % 2 == 0 else 0.55
        val = 0.95 if (i // 2) % 2 == 0 else 0.7
        out.append([round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(out, dtype=np.uint8)


def _kmeans_labels(pixels: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k == 1:  # one cluster: nothing to fit (and OpenCV reads a single (1, 3) sample as three 1-D samples)
        return np.zeros(len(pixels), dtype=np.int32)
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    _, labels, _ = cv2.kmeans(pixels.astype(np.float32), k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    return labels.reshape(-1)


def _by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """Relabel so that label 0 is the largest region (stable colours across runs and images)."""
    counts = np.bincount(labels.reshape(-1), minlength=k)
    order = np.argsort(-counts, kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[labels]


def _nearest(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest colour for each pixel, one colour at a time to keep memory at O(pixels)."""
    best = np.full(len(pixels), np.iinfo(np.int64).max, dtype=np.int64)
    labels = np.zeros(len(pixels), dtype=np.int64)
    for i, colour in enumerate(colours):
        dist = ((pixels - colour) ** 2).sum(1)
        closer = dist < best
        best[closer], labels[closer] = dist[closer], i
    return labels


def segment(
    image: ImageInput, segments: int = 8, smoothing: int = 7, source: str = "photo", seed: int = 0
) -> Image.Image:
    """A flat colour map of ``image`` with at most ``segments`` regions.

    ``source='photo'``: cluster the smoothed image's colours into ``segments`` groups and paint each with a
    distinct :func:`palette` colour (largest region first). ``source='map'``: ``image`` is already a colour map;
    its ``segments`` dominant colours are kept and every pixel snaps to the nearest of them. ``smoothing`` (odd
    kernel size, 0 = off) removes speckles.
    """
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"segments must lie in [1, {MAX_SEGMENTS}], got {segments}.")
    if smoothing < 0 or smoothing > 31:
        raise ValueError(f"smoothing must be 0 (off) or a kernel size up to 31, got {smoothing}.")
    if source not in ("photo", "map"):
        raise ValueError(f"segment source must be 'photo' or 'map', got {source!r}.")
    rgb = to_rgb_array(image)
    h, w, _ = rgb.shape
    k = smoothing if smoothing % 2 == 1 else smoothing + 1
    if source == "photo":
        work = cv2.bilateralFilter(rgb, 9, 60, 9) if smoothing else rgb
        lab = cv2.cvtColor(work, cv2.COLOR_RGB2LAB).reshape(-1, 3)
        n = min(segments, len(np.unique(lab, axis=0)))
        labels = _by_size(_kmeans_labels(lab, n, seed), n).reshape(h, w)
        colours = palette(n)
    else:
        flat = rgb.reshape(-1, 3)
        # Count colours in coarse bins (32 levels per channel) so noise around one flat colour lands in one bin;
        # each dominant bin is represented by the mean of its pixels.
        bins = (flat // 32).astype(np.int32) @ np.array([64, 8, 1], dtype=np.int32)
        counts = np.bincount(bins, minlength=512)
        top = [b for b in np.argsort(-counts, kind="stable")[:segments] if counts[b] > 0]
        colours = np.stack([flat[bins == b].mean(0) for b in top]).round().astype(np.uint8)
        labels = _nearest(flat.astype(np.int32), colours.astype(np.int32))
        # One refinement step: each colour becomes the mean of the pixels that snapped to it.
        colours = np.stack([flat[labels == i].mean(0) for i in range(len(colours))]).round().astype(np.uint8)
        labels = labels.reshape(h, w)
    if smoothing > 1:
        # A median filter on the label image removes isolated pixels without inventing new labels.
        labels = cv2.medianBlur(labels.astype(np.uint8), k)  # labels < MAX_SEGMENTS fit uint8
    return Image.fromarray(colours[labels.astype(np.int64)])
