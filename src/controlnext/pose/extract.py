"""From a reference image and a driving video to the pose images the video model is conditioned on."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from .align import PoseAlignment, fit_pose_alignment
from .draw import draw_pose
from .types import PoseFrame

__all__ = ["DrivingPoses", "driving_poses"]


class DrivingPoses(list):
    """Rendered pose images (RGB uint8) with the detected poses and the alignment used (``None`` when off)."""

    reference_pose: PoseFrame
    poses: list[PoseFrame]
    alignment: PoseAlignment | None


def driving_poses(
    reference: np.ndarray,
    frames: Iterable[np.ndarray],
    detector: Callable[[np.ndarray], PoseFrame],
    *,
    align: bool = True,
    include_reference: bool = True,
    supersample: int | None = 2160,
    progress: bool = True,
) -> DrivingPoses:
    """Detect poses in the driving ``frames``, align them to ``reference``'s body and draw them at its size.

    ``reference``: RGB uint8 (H, W, 3), already at the generation size. ``frames``: RGB uint8 driving frames (may
    be a generator: poses are detected as frames arrive and frames are not kept). ``include_reference`` puts the
    reference image's own pose first, as the release does, so the first generated frame matches the reference.
    """
    height, width = reference.shape[:2]
    ref_pose = detector(reference)
    poses: list[PoseFrame] = []
    video_size = None
    for frame in tqdm(frames, desc="DWPose", unit="frame", disable=not progress):
        video_size = video_size or frame.shape[:2]
        poses.append(detector(frame))
    if not poses:
        raise ValueError("The driving video has no frames.")
    alignment = fit_pose_alignment(ref_pose, poses, (height, width), video_size) if align else None
    drawn = [alignment.apply(p) if alignment else p for p in poses]
    images = [draw_pose(p, height, width, supersample=supersample) for p in drawn]
    if include_reference:
        images.insert(0, draw_pose(ref_pose, height, width, supersample=supersample))
    out = DrivingPoses(images)
    out.reference_pose, out.poses, out.alignment = ref_pose, poses, alignment
    return out
