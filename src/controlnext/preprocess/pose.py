"""Pose conditions: draw OpenPose-style skeletons from keypoints, or detect them with DWPose (ONNX, local files).

Keypoints follow the 18-point OpenPose body order (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist,
right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear), 21 points per hand and 68 face
points, each ``(x, y, score)`` in pixels of a ``width`` x ``height`` canvas. Drawing uses the colour and limb
conventions of OpenPose/DWPose renderings that pose-conditioned image models were trained on. (The video pipeline
draws with :func:`controlnext.pose.draw_pose`, the SVD release's supersampled rendering; detection is shared.)
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..pose.dwpose import DWPOSE_FILES, find_dwpose_files
from ._image import ImageInput, to_rgb_array

__all__ = [
    "BODY_LIMBS",
    "BODY_COLORS",
    "HAND_EDGES",
    "DWPOSE_FILES",
    "PoseKeypoints",
    "draw_pose",
    "load_openpose_json",
    "find_dwpose_files",
    "detect_pose",
    "pose",
]

# Pairs of body keypoint indices (0-based) joined by a limb, in OpenPose's drawing order.
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# One colour per limb and per keypoint (RGB).
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Hand skeleton: wrist (0) to each finger's four joints.
HAND_EDGES: tuple[tuple[int, int], ...] = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)
)


@dataclass
class PoseKeypoints:
    """Keypoints of the people in one image, in pixels of a ``width`` x ``height`` canvas.

    ``body``: (P, 18, 3) x, y, score; ``hands``: (P, 2, 21, 3) (left, right) or None; ``face``: (P, 68, 3) or None.
    A score of 0 marks a keypoint that was not detected.
    """

    body: np.ndarray
    width: int
    height: int
    hands: np.ndarray | None = None
    face: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.body = np.asarray(self.body, dtype=np.float64).reshape(-1, 18, 3)
        if self.hands is not None:
            self.hands = np.asarray(self.hands, dtype=np.float64).reshape(len(self.body), 2, 21, 3)
        if self.face is not None:
            self.face = np.asarray(self.face, dtype=np.float64).reshape(len(self.body), 68, 3)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Pose canvas size must be positive, got {self.width}x{self.height}.")


def _scaled(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    out = points.copy()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def draw_pose(
    keypoints: PoseKeypoints,
    width: int | None = None,
    height: int | None = None,
    min_score: float = 0.3,
    hands: bool = True,
    face: bool = True,
) -> Image.Image:
    """Render ``keypoints`` on black, at ``width`` x ``height`` (default: the keypoints' canvas size).

    Limbs are filled ellipses in 60 % of their colour, joints full-colour dots, hand bones rainbow lines with blue
    joints, face points white dots. Keypoints scoring below ``min_score`` (and limbs touching them) are skipped.
    """
    w, h = width or keypoints.width, height or keypoints.height
    sx, sy = w / keypoints.width, h / keypoints.height
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    # Line widths as in the reference renderings at ~512 px, scaled with the canvas so small previews stay legible.
    unit = max(1.0, min(w, h) / 512)
    stick, radius = max(1, round(4 * unit)), max(1, round(4 * unit))

    for person in _scaled(keypoints.body, sx, sy):
        for (a, b), colour in zip(BODY_LIMBS, BODY_COLORS):
            if person[a, 2] < min_score or person[b, 2] < min_score:
                continue
            (xa, ya), (xb, yb) = person[a, :2], person[b, :2]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            poly = cv2.ellipse2Poly(
                (round((xa + xb) / 2), round((ya + yb) / 2)), (round(length / 2), stick), round(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in colour])
        for i, colour in enumerate(BODY_COLORS):
            if person[i, 2] >= min_score:
                cv2.circle(canvas, (round(person[i, 0]), round(person[i, 1])), radius, colour, thickness=-1)

    if hands and keypoints.hands is not None:
        for hand in _scaled(keypoints.hands, sx, sy).reshape(-1, 21, 3):
            for e, (a, b) in enumerate(HAND_EDGES):
                if hand[a, 2] < min_score or hand[b, 2] < min_score:
                    continue
                rgb = colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)
                cv2.line(
                    canvas,
                    (round(hand[a, 0]), round(hand[a, 1])),
                    (round(hand[b, 0]), round(hand[b, 1])),
                    [round(c * 255) for c in rgb],
                    thickness=max(1, round(2 * unit)),
                )
            for x, y, s in hand:
                if s >= min_score:
                    cv2.circle(canvas, (round(x), round(y)), radius, (0, 0, 255), thickness=-1)

    if face and keypoints.face is not None:
        for x, y, s in _scaled(keypoints.face, sx, sy).reshape(-1, 3):
            if s >= min_score:
                cv2.circle(canvas, (round(x), round(y)), max(1, round(3 * unit)), (255, 255, 255), thickness=-1)
    return Image.fromarray(canvas)


def load_openpose_json(path: str | Path, width: int | None = None, height: int | None = None) -> PoseKeypoints:
    """Read an OpenPose-format JSON file (``people[*].pose_keypoints_2d`` etc., flat x, y, score lists).

    The canvas size comes from ``canvas_width``/``canvas_height`` in the file or from ``width``/``height``.
    Coordinates that all lie in [0, 1] are taken as normalised and scaled to the canvas.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pose keypoint file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path.name} is not valid JSON: {err}") from err
    if isinstance(data, list):  # some tools write a list of frames; take the first
        data = data[0] if data else {}
    people = data.get("people")
    if not isinstance(people, list):
        raise ValueError(f"{path.name}: expected an OpenPose JSON object with a 'people' list.")
    w = int(data.get("canvas_width") or width or 0)
    h = int(data.get("canvas_height") or height or 0)
    if w <= 0 or h <= 0:
        raise ValueError(f"{path.name} has no canvas_width/canvas_height; pass the canvas size (--width/--height).")

    def points(person: dict, key: str, n: int) -> np.ndarray | None:
        flat = person.get(key)
        if not flat:
            return None
        arr = np.asarray(flat, dtype=np.float64)
        if arr.size != n * 3:
            raise ValueError(f"{path.name}: '{key}' must hold {n} x 3 numbers (x, y, score), got {arr.size}.")
        return arr.reshape(n, 3)

    body, hands, face = [], [], []
    for person in people:
        b = points(person, "pose_keypoints_2d", 18)
        body.append(b if b is not None else np.zeros((18, 3)))
        lh, rh = points(person, "hand_left_keypoints_2d", 21), points(person, "hand_right_keypoints_2d", 21)
        hands.append(np.stack([x if x is not None else np.zeros((21, 3)) for x in (lh, rh)]))
        f = points(person, "face_keypoints_2d", 68)
        face.append(f if f is not None else np.zeros((68, 3)))
    body_arr = np.stack(body) if body else np.zeros((0, 18, 3))
    hands_arr = np.stack(hands) if hands else None
    face_arr = np.stack(face) if face else None
    xy = [a[..., :2][a[..., 2] > 0] for a in (body_arr, hands_arr, face_arr) if a is not None]
    coords = np.concatenate(xy) if xy else np.zeros((0, 2))
    if coords.size and coords.max() <= 1.0:
        body_arr, hands_arr, face_arr = (
            None if a is None else _scaled(a, w, h) for a in (body_arr, hands_arr, face_arr)
        )
    return PoseKeypoints(body=body_arr, width=w, height=h, hands=hands_arr, face=face_arr)


def detect_pose(image: ImageInput, model_dir: str | Path | None) -> PoseKeypoints:
    """Detect body, hand and face keypoints of everyone in ``image`` with DWPose (onnxruntime, local files).

    ``model_dir`` holds ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` (see :func:`controlnext.pose.find_dwpose_files`,
    which also reads ``$CONTROLNEXT_DWPOSE_DIR``); a missing file is a FileNotFoundError naming it.
    """
    from ..pose import DWPoseDetector

    detector = DWPoseDetector(*find_dwpose_files(model_dir))
    rgb = to_rgb_array(image)
    frame = detector(rgb)
    h, w = rgb.shape[:2]
    body, hands, face = frame.to_pixels(w, h)
    return PoseKeypoints(body=body, width=w, height=h, hands=hands, face=face)


def pose(
    source: ImageInput,
    model_dir: str | Path | None = None,
    width: int | None = None,
    height: int | None = None,
    min_score: float = 0.3,
    hands: bool = True,
    face: bool = True,
) -> Image.Image:
    """Pose condition from an OpenPose JSON file (drawn directly) or from a photo (DWPose, needs ``model_dir``)."""
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".json":
        keypoints = load_openpose_json(source, width, height)
    elif isinstance(source, PoseKeypoints):
        keypoints = source
    else:
        keypoints = detect_pose(source, model_dir)
    return draw_pose(keypoints, width, height, min_score=min_score, hands=hands, face=face)
