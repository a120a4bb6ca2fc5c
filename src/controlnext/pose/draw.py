"""Render poses as OpenPose-style images, the way the published video models' pose inputs were drawn.

Conventions of the release's renderer, reproduced here: the canvas is drawn at ``supersample`` pixels on its short
side and resized to the requested size at the end; limbs are filled ellipses (half-width 4) whose colour is scaled
by the product of the two joints' scores, then the limb layer is dimmed to 60 %; joints are discs of radius 4;
hands are 2 px lines coloured around the hue circle with red joints; face points are grey discs of radius 3 whose
brightness is the score. Colours are written in BGR order and the canvas is converted to RGB at the end, so the
palette matches the images the models were trained on. Drawing is deterministic (OpenCV rasterisation only).
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .types import PoseFrame

__all__ = ["BODY_COLORS", "BODY_LIMBS", "HAND_EDGES", "draw_pose", "draw_poses"]

# Body limbs as pairs of OpenPose joint indices; the release draws the first 17 (not the ear-shoulder pairs).
BODY_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
              (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))  # fmt: skip
DRAWN_LIMBS = 17
BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))  # fmt: skip
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))  # fmt: skip
# Hand edge colours around the hue circle, as [0, 1] floats (scaled by the edge's score x 255 when drawn).
HAND_COLORS = tuple(colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0) for i in range(len(HAND_EDGES)))

BODY_THRESHOLD = 0.3
STICK_WIDTH = 4
_EPS = 0.01  # points at (0, 0) (or off the left/top edge) are treated as missing, as in the release


def _draw_body(canvas: np.ndarray, pose: PoseFrame) -> np.ndarray:
    h, w = canvas.shape[:2]
    size = np.array([w, h], dtype=np.float64)
    for i, (a, b) in enumerate(BODY_LIMBS[:DRAWN_LIMBS]):
        for person, scores in zip(pose.body, pose.body_scores):
            if scores[a] < BODY_THRESHOLD or scores[b] < BODY_THRESHOLD:
                continue
            (x0, y0), (x1, y1) = person[a] * size, person[b] * size
            length = math.hypot(x0 - x1, y0 - y1)
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
            polygon = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
            alpha = scores[a] * scores[b]
            cv2.fillConvexPoly(canvas, polygon, [int(c * alpha) for c in BODY_COLORS[i]])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(len(BODY_COLORS)):
        for person, scores in zip(pose.body, pose.body_scores):
            if scores[i] <= BODY_THRESHOLD:
                continue
            x, y = int(person[i, 0] * w), int(person[i, 1] * h)
            cv2.circle(canvas, (x, y), 4, [int(c * scores[i]) for c in BODY_COLORS[i]], thickness=-1)
    return canvas


def _draw_hands(canvas: np.ndarray, pose: PoseFrame) -> None:
    h, w = canvas.shape[:2]
    for peaks, scores in zip(pose.hands, pose.hand_scores):
        pts = [(int(x * w), int(y * h)) for x, y in peaks]
        for ie, (a, b) in enumerate(HAND_EDGES):
            (x1, y1), (x2, y2) = pts[a], pts[b]
            if min(x1, y1, x2, y2) > _EPS:
                score = int(scores[a] * scores[b] * 255)
                cv2.line(canvas, (x1, y1), (x2, y2), [c * score for c in HAND_COLORS[ie]], thickness=2)
        for (x, y), s in zip(pts, scores):
            if x > _EPS and y > _EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, int(s * 255)), thickness=-1)


def _draw_faces(canvas: np.ndarray, pose: PoseFrame) -> None:
    h, w = canvas.shape[:2]
    for lmks, scores in zip(pose.faces, pose.face_scores):
        for (x, y), s in zip(lmks, scores):
            x, y = int(x * w), int(y * h)
            if x > _EPS and y > _EPS:
                conf = int(s * 255)
                cv2.circle(canvas, (x, y), 3, (conf, conf, conf), thickness=-1)


def draw_pose(
    pose: PoseFrame, height: int, width: int, *, supersample: int | None = 2160, hands: bool = True, face: bool = True
) -> np.ndarray:
    """Draw one frame's poses on a black (height, width) canvas; returns RGB uint8 (height, width, 3).

    ``supersample``: short side of the internal canvas (the release draws at 2160 px and resizes down, which makes
    strokes thin at typical sizes); ``None`` draws at the output size.
    """
    if height < 1 or width < 1:
        raise ValueError(f"Pose canvas must be at least 1x1, got {width}x{height}.")
    ratio = supersample / min(height, width) if supersample and supersample != min(height, width) else 1.0
    canvas = np.zeros((int(height * ratio), int(width * ratio), 3), dtype=np.uint8)
    canvas = _draw_body(canvas, pose)
    if hands:
        _draw_hands(canvas, pose)
    if face:
        _draw_faces(canvas, pose)
    if canvas.shape[:2] != (height, width):
        canvas = cv2.resize(canvas, (width, height))
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def draw_poses(poses, height: int, width: int, **kwargs) -> list[np.ndarray]:
    """:func:`draw_pose` for a sequence of frames."""
    return [draw_pose(p, height, width, **kwargs) for p in poses]
