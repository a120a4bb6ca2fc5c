"""A small synthetic video + pose dataset (a figure moving across a background) for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from ..pose import PoseFrame, draw_pose
from ..video_io import write_video

__all__ = ["make_synthetic_video_dataset"]

# An upright 18-point body, relative to its centre, in units of its height.
_BODY = np.array([[0, -0.45], [0, -0.33], [-0.1, -0.33], [-0.15, -0.15], [-0.18, 0.0], [0.1, -0.33], [0.15, -0.15],
                  [0.18, 0.0], [-0.06, 0.02], [-0.07, 0.25], [-0.08, 0.48], [0.06, 0.02], [0.07, 0.25],
                  [0.08, 0.48], [-0.02, -0.47], [0.02, -0.47], [-0.04, -0.46], [0.04, -0.46]])  # fmt: skip


def _body_pose(cx: float, cy: float, height: float, swing: float) -> PoseFrame:
    body = _BODY.copy()
    body[[4, 7], 1] -= swing  # wrists go up and down
    kp = np.zeros((1, 134, 2))
    sc = np.zeros((1, 134))
    kp[0, :18] = body * height + [cx, cy]
    sc[0, :18] = 1.0
    return PoseFrame.from_wholebody(kp, sc)


def make_synthetic_video_dataset(
    root: str | Path, clips: int = 2, frames: int = 8, size: int = 64, as_video: bool = True, seed: int = 0
) -> Path:
    """Write ``clips`` clip folders (video + drawn poses, the documented layout) under ``root``; returns ``root``.

    The "person" is a bright blob that follows the drawn skeleton, so the poses carry real information about the
    frames. ``as_video`` writes ``video.mp4``/``pose.mp4``; otherwise ``frames/`` and ``poses/`` folders of PNGs.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(clips):
        background = (rng.uniform(0.1, 0.4, 3) * 255).astype(np.uint8)
        color = rng.uniform(0.6, 1.0, 3) * 255
        x0, dx = rng.uniform(0.3, 0.5), rng.uniform(-0.02, 0.02)
        video, poses = [], []
        for f in range(frames):
            cx, cy, swing = x0 + dx * f, 0.5, 0.1 * np.sin(f / 2)
            pose = _body_pose(cx, cy, 0.7, swing)
            poses.append(draw_pose(pose, size, size, supersample=None))
            mask = np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - cy) / 0.3) ** 2))[..., None]
            video.append((background * (1 - mask) + color * mask).astype(np.uint8))
        folder = root / f"clip_{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if as_video:
            # Lossless-enough for a smoke test; the loaders handle both forms the same way.
            write_video(video, folder / "video.mp4", fps=8, quality=10)
            write_video(poses, folder / "pose.mp4", fps=8, quality=10)
        else:
            for name, seq in (("frames", video), ("poses", poses)):
                (folder / name).mkdir(exist_ok=True)
                for i, img in enumerate(seq):
                    PIL.Image.fromarray(img).save(folder / name / f"{i:04d}.png")
    return root
