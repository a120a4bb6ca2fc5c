"""Post-processing of DWPose / RTMPose outputs: SimCC decoding, the crop transform, and the OpenPose re-ordering.

RTMPose-style heads predict each keypoint as two 1-D classification vectors ("SimCC"): one over x and one over y
bins, ``split_ratio`` bins per input pixel. Decoding takes the arg-max of each; the confidence is the smaller of the
two maxima.
"""

from __future__ import annotations

import numpy as np

from .types import WHOLEBODY_POINTS

__all__ = [
    "OPENPOSE_FROM_COCO",
    "bbox_to_center_scale",
    "crop_transform",
    "decode_simcc",
    "fix_aspect_ratio",
    "keypoints_to_image",
    "wholebody_to_openpose",
]

# COCO-WholeBody body index -> OpenPose body index (the neck, inserted at index 17, goes to 1).
OPENPOSE_FROM_COCO = {17: 1, 6: 2, 8: 3, 10: 4, 5: 5, 7: 6, 9: 7, 12: 8, 14: 9, 16: 10, 11: 11, 13: 12, 15: 13,
                      2: 14, 1: 15, 4: 16, 3: 17}  # fmt: skip


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Decode SimCC vectors to keypoints in model-input pixels.

    ``simcc_x`` (N, K, Wx) and ``simcc_y`` (N, K, Wy) (or without the N axis). Returns ``(locations (N, K, 2),
    scores (N, K))``: location = arg-max bin / ``split_ratio``; score = min(max over x, max over y). Keypoints
    whose score is not positive get location -1 / ``split_ratio`` (the reference decoder's convention).
    """
    simcc_x = np.asarray(simcc_x, dtype=np.float32)
    simcc_y = np.asarray(simcc_y, dtype=np.float32)
    squeeze = simcc_x.ndim == 2
    if squeeze:
        simcc_x, simcc_y = simcc_x[None], simcc_y[None]
    if simcc_x.ndim != 3 or simcc_y.ndim != 3 or simcc_x.shape[:2] != simcc_y.shape[:2]:
        raise ValueError(
            f"SimCC outputs must be (N, K, Wx) and (N, K, Wy) with the same N and K; got {simcc_x.shape} and "
            f"{simcc_y.shape}."
        )
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[scores <= 0] = -1
    locs = locs / split_ratio
    return (locs[0], scores[0]) if squeeze else (locs, scores)


def bbox_to_center_scale(bbox: np.ndarray, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(x1, y1, x2, y2) box -> centre (2,) and padded size (2,)."""
    x1, y1, x2, y2 = np.asarray(bbox, dtype=np.float32)[:4]
    center = np.array([x1 + x2, y1 + y2], dtype=np.float32) * 0.5
    scale = np.array([x2 - x1, y2 - y1], dtype=np.float32) * padding
    return center, scale


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the box size (w, h) along one axis so that w / h equals ``aspect_ratio``."""
    w, h = scale
    return np.array([w, w / aspect_ratio] if w > h * aspect_ratio else [h * aspect_ratio, h], dtype=np.float32)


def crop_transform(center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """2x3 affine matrix mapping the box (``center``, ``scale`` with the input's aspect ratio) onto the input."""
    w, h = input_size
    k = w / float(scale[0])
    return np.array([[k, 0.0, w * 0.5 - k * center[0]], [0.0, k, h * 0.5 - k * center[1]]], dtype=np.float64)


def keypoints_to_image(
    locations: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """Map keypoints from model-input pixels back to image pixels (inverse of :func:`crop_transform`)."""
    size = np.asarray(input_size, dtype=np.float32)
    return locations / size * scale + center - scale / 2


def wholebody_to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody (N, 133) keypoints -> DWPose's (N, 134) layout with an 18-point OpenPose body.

    A neck is inserted (mean of the shoulders; its score is 1 when both shoulders score above 0.3, else 0) and the
    body points are re-ordered to OpenPose's order; feet, face and hands follow unchanged.
    """
    keypoints = np.asarray(keypoints, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if keypoints.shape[1:] != (WHOLEBODY_POINTS - 1, 2) or scores.shape != keypoints.shape[:2]:
        raise ValueError(
            f"Expected COCO-WholeBody keypoints (N, {WHOLEBODY_POINTS - 1}, 2) and scores (N, "
            f"{WHOLEBODY_POINTS - 1}); got {keypoints.shape} and {scores.shape}."
        )
    neck = keypoints[:, [5, 6]].mean(axis=1, keepdims=True)
    neck_score = ((scores[:, 5] > 0.3) & (scores[:, 6] > 0.3)).astype(np.float32)[:, None]
    kp = np.concatenate([keypoints[:, :17], neck, keypoints[:, 17:]], axis=1)
    sc = np.concatenate([scores[:, :17], neck_score, scores[:, 17:]], axis=1)
    out_kp, out_sc = kp.copy(), sc.copy()
    for src, dst in OPENPOSE_FROM_COCO.items():
        out_kp[:, dst] = kp[:, src]
        out_sc[:, dst] = sc[:, src]
    return out_kp, out_sc
