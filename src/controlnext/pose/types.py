"""Whole-body pose keypoints in the layout DWPose produces and the published video models were trained on.

Coordinates are normalised to [0, 1] of the image (x to the right, y down). The body uses the 18-point OpenPose
order (0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg, 14/15 eyes, 16/17 ears); each
person also has 6 foot points, 68 face points and two hands of 21 points.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

__all__ = ["BODY_POINTS", "FACE_POINTS", "FOOT_POINTS", "HAND_POINTS", "WHOLEBODY_POINTS", "PoseFrame"]

BODY_POINTS = 18
FOOT_POINTS = 6
FACE_POINTS = 68
HAND_POINTS = 21
# 18 body (with the neck DWPose adds) + 6 feet + 68 face + 21 left hand + 21 right hand.
WHOLEBODY_POINTS = BODY_POINTS + FOOT_POINTS + FACE_POINTS + 2 * HAND_POINTS


def _points(n: int, k: int) -> np.ndarray:
    return np.zeros((n, k, 2), dtype=np.float64)


@dataclass
class PoseFrame:
    """Keypoints of the N people found in one frame.

    ``body`` (N, 18, 2), ``feet`` (N, 6, 2), ``faces`` (N, 68, 2) and ``hands`` (2N, 21, 2) with matching
    ``*_scores`` arrays (confidence, higher is surer). ``hands`` lists every person's left hand, then every
    person's right hand (the order the release draws them in).
    """

    body: np.ndarray
    body_scores: np.ndarray
    feet: np.ndarray
    feet_scores: np.ndarray
    faces: np.ndarray
    face_scores: np.ndarray
    hands: np.ndarray
    hand_scores: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.body)
        expected = {
            "body": (n, BODY_POINTS),
            "feet": (n, FOOT_POINTS),
            "faces": (n, FACE_POINTS),
            "hands": (2 * n, HAND_POINTS),
        }
        for name, (rows, k) in expected.items():
            pts = np.asarray(getattr(self, name), dtype=np.float64).reshape(rows, k, 2)
            scores = np.asarray(getattr(self, _score_name(name)), dtype=np.float64).reshape(rows, k)
            setattr(self, name, pts)
            setattr(self, _score_name(name), scores)

    @property
    def num_people(self) -> int:
        return len(self.body)

    @classmethod
    def empty(cls) -> PoseFrame:
        """A frame in which nobody was found."""
        return cls.from_wholebody(np.zeros((0, WHOLEBODY_POINTS, 2)), np.zeros((0, WHOLEBODY_POINTS)))

    @classmethod
    def from_wholebody(cls, keypoints: np.ndarray, scores: np.ndarray) -> PoseFrame:
        """Split (N, 134, 2) normalised keypoints in DWPose's OpenPose-ordered layout (and (N, 134) scores)."""
        keypoints = np.asarray(keypoints, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        if keypoints.ndim != 3 or keypoints.shape[1:] != (WHOLEBODY_POINTS, 2) or scores.shape != keypoints.shape[:2]:
            raise ValueError(
                f"Expected keypoints (N, {WHOLEBODY_POINTS}, 2) and scores (N, {WHOLEBODY_POINTS}); got "
                f"{keypoints.shape} and {scores.shape}."
            )
        b, f, c = BODY_POINTS, BODY_POINTS + FOOT_POINTS, BODY_POINTS + FOOT_POINTS + FACE_POINTS
        h = c + HAND_POINTS
        return cls(
            body=keypoints[:, :b],
            body_scores=scores[:, :b],
            feet=keypoints[:, b:f],
            feet_scores=scores[:, b:f],
            faces=keypoints[:, f:c],
            face_scores=scores[:, f:c],
            hands=np.concatenate([keypoints[:, c:h], keypoints[:, h:]]),
            hand_scores=np.concatenate([scores[:, c:h], scores[:, h:]]),
        )

    def transformed(self, scale: tuple[float, float], offset: tuple[float, float]) -> PoseFrame:
        """All keypoints mapped by x' = sx * x + ox, y' = sy * y + oy (scores unchanged)."""
        a = np.asarray(scale, dtype=np.float64)
        b = np.asarray(offset, dtype=np.float64)
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("body", "feet", "faces", "hands"):
            kwargs[name] = kwargs[name] * a + b
        return PoseFrame(**kwargs)

    def to_pixels(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, score) arrays in pixels of a ``width`` x ``height`` image: body (N, 18, 3), hands (N, 2, 21, 3)
        as (left, right) per person, face (N, 68, 3)."""
        size = np.array([width, height], dtype=np.float64)
        n = self.num_people

        def xys(points: np.ndarray, scores: np.ndarray) -> np.ndarray:
            return np.concatenate([points * size, scores[..., None]], axis=-1)

        hands = xys(self.hands, self.hand_scores).reshape(2, n, HAND_POINTS, 3).transpose(1, 0, 2, 3)
        return xys(self.body, self.body_scores), hands, xys(self.faces, self.face_scores)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for JSON."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> PoseFrame:
        """Inverse of :meth:`to_dict`."""
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"Pose data lacks the fields {missing}.")
        return cls(**{f.name: np.asarray(data[f.name], dtype=np.float64) for f in fields(cls)})


def _score_name(name: str) -> str:
    return {"body": "body_scores", "feet": "feet_scores", "faces": "face_scores", "hands": "hand_scores"}[name]
