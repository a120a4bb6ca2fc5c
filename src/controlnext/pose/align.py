"""Align driving poses to the reference image's body (scale and offset), as the published video release does.

The release fits, by least squares over all driving frames, a linear map from the driving keypoints' y to the
reference's y (slope ``ay``, offset ``by``) using the body points 0, 1, 2, 5 and 8-17 that are detected in the
reference. The x slope follows from ``ay`` and the two aspect ratios (so that a body keeps its proportions in
pixels), and the x offset is the mean remaining difference. Coordinates are normalised to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .types import PoseFrame

__all__ = ["ALIGN_BODY_POINTS", "PoseAlignment", "fit_pose_alignment"]

# Nose, neck, shoulders, hips, knees, ankles, eyes, ears (not elbows and wrists, which move the most).
ALIGN_BODY_POINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
VISIBLE_THRESHOLD = 0.3


@dataclass(frozen=True)
class PoseAlignment:
    """x' = ax * x + bx, y' = ay * y + by, in normalised coordinates."""

    ax: float
    ay: float
    bx: float
    by: float

    def apply(self, pose: PoseFrame) -> PoseFrame:
        """Map every keypoint (body, feet, face, hands) of ``pose``."""
        return pose.transformed((self.ax, self.ay), (self.bx, self.by))


def fit_pose_alignment(
    reference: PoseFrame,
    driving: Sequence[PoseFrame],
    reference_size: tuple[int, int],
    video_size: tuple[int, int],
) -> PoseAlignment:
    """Fit the map from the driving video's poses onto the reference image's first person.

    ``reference_size`` = (H, W) of the reference image, ``video_size`` = (height, width) of the driving frames.
    Only driving frames with exactly one person are used (as in the release). Raises ``ValueError`` when the
    reference has no detected body points or no driving frame has exactly one person.
    """
    if reference.num_people == 0:
        raise ValueError("No person was detected in the reference image, so the driving poses cannot be aligned.")
    ids = [i for i in ALIGN_BODY_POINTS if reference.body_scores[0, i] > VISIBLE_THRESHOLD]
    if not ids:
        raise ValueError(
            "None of the reference image's head, shoulder, hip or leg keypoints was detected with confidence; "
            "use a clearer full-body reference image or pass pre-aligned poses."
        )
    frames = [p.body[0, ids] for p in driving if p.num_people == 1]
    if not frames:
        raise ValueError("No driving frame shows exactly one person; the pose alignment needs single-person frames.")
    drv = np.stack(frames)  # (T, len(ids), 2)
    ref = np.broadcast_to(reference.body[0, ids], drv.shape)
    x, y = drv[..., 0].ravel(), drv[..., 1].ravel()
    rx, ry = ref[..., 0].ravel(), ref[..., 1].ravel()
    if np.ptp(y) <= 1e-12:
        raise ValueError("The driving keypoints all have the same height; cannot fit a vertical scale.")
    # Least-squares line ry = ay * y + by (what numpy.polyfit(y, ry, 1) computes).
    ym, rym = y.mean(), ry.mean()
    ay = float(((y - ym) * (ry - rym)).sum() / ((y - ym) ** 2).sum())
    by = float(rym - ay * ym)
    height, width = reference_size
    fh, fw = video_size
    # Equal pixel scale on both axes: ax / ay = (fw / fh) * (H / W).
    ax = ay / (fh / fw / height * width)
    bx = float(np.mean(rx - x * ax))
    return PoseAlignment(ax=float(ax), ay=ay, bx=bx, by=by)
