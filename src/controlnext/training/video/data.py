"""Video + pose training data: a documented folder layout, frame sampling, and a deterministic batch order.

Layout (one folder per clip under the dataset root)::

    dataset/
      clip_0001/
        video.mp4   (or frames/ with 0000.png, 0001.png, ...)   the RGB frames
        pose.mp4    (or poses/ with one drawn pose image per frame) the control frames, same count as the video
        reference.png                                            optional; default: the first sampled frame
      clip_0002/ ...

Each sample takes ``num_frames`` frames ``sample_stride`` apart from a random start, resized and centre-cropped to
``width`` x ``height`` (video and poses alike), and the reference image. Randomness comes from the seed passed with
each index, so a resumed run reads exactly the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ...video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, count_frames, read_video, resize_and_center_crop

__all__ = ["VideoClipEntry", "VideoPoseDataset", "StepBatchSampler", "collate_video", "find_clips"]

_VIDEO_NAMES = ("video", "frames")
_POSE_NAMES = ("pose", "poses")


@dataclass
class VideoClipEntry:
    """One clip: where its frames, poses and (optional) reference image are, and its length."""

    name: str
    video: Path
    pose: Path
    reference: Path | None
    length: int


def _source(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
        for ext in VIDEO_EXTENSIONS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def find_clips(root: str | Path, min_frames: int = 1) -> list[VideoClipEntry]:
    """Scan ``root`` for clip folders; raises ValueError naming every clip that does not fit the layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Video dataset folder not found: {root}")
    clips, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        video, pose = _source(folder, _VIDEO_NAMES), _source(folder, _POSE_NAMES)
        if video is None or pose is None:
            wanted = (("video.* or frames/", video), ("pose.* or poses/", pose))
            missing = " and ".join(name for name, found in wanted if found is None)
            problems.append(f"{folder.name}: no {missing}")
            continue
        try:
            n_video, n_pose = count_frames(video), count_frames(pose)
        except ValueError as err:
            problems.append(f"{folder.name}: {err}")
            continue
        if n_video != n_pose:
            problems.append(f"{folder.name}: {n_video} video frames but {n_pose} pose frames (need one pose per frame)")
            continue
        if n_video < min_frames:
            problems.append(f"{folder.name}: {n_video} frames, fewer than the {min_frames} one sample spans")
            continue
        refs = [folder / f"reference{ext}" for ext in IMAGE_EXTENSIONS if (folder / f"reference{ext}").is_file()]
        clips.append(VideoClipEntry(folder.name, video, pose, refs[0] if refs else None, n_video))
    if problems:
        raise ValueError(f"Video dataset {root} has clips that cannot be used:\n  " + "\n  ".join(problems))
    if not clips:
        raise ValueError(
            f"Video dataset {root} holds no clip folders; each clip needs video.mp4 (or frames/) and pose.mp4 "
            "(or poses/) with one pose image per frame."
        )
    return clips


class VideoPoseDataset(torch.utils.data.Dataset):
    """Samples of ``num_frames`` frames. Index with ``(clip_index, seed)``; the seed picks the start frame.

    Returns ``pixel_values`` (F, 3, H, W) in [-1, 1], ``pose`` (F, 3, H, W) in [0, 1] and ``reference``
    (3, H, W) in [-1, 1].
    """

    def __init__(self, root: str | Path, width: int, height: int, num_frames: int = 14, sample_stride: int = 2):
        if num_frames < 1 or sample_stride < 1:
            raise ValueError(f"num_frames and sample_stride must be >= 1, got {num_frames} and {sample_stride}.")
        self.width, self.height = width, height
        self.num_frames, self.sample_stride = num_frames, sample_stride
        self.span = (num_frames - 1) * sample_stride + 1
        self.clips = find_clips(root, min_frames=self.span)

    def __len__(self) -> int:
        return len(self.clips)

    def _frames(self, path: Path, start: int) -> torch.Tensor:
        clip = read_video(path, start=start, stride=self.sample_stride, max_frames=self.num_frames)
        frames = np.stack([resize_and_center_crop(f, self.width, self.height) for f in clip.frames])
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        clip = self.clips[index]
        start = int(np.random.default_rng(seed).integers(0, clip.length - self.span + 1))
        video = self._frames(clip.video, start)
        pose = self._frames(clip.pose, start)
        if clip.reference is not None:
            with PIL.Image.open(clip.reference) as im:
                ref = torch.from_numpy(resize_and_center_crop(im, self.width, self.height)).permute(2, 0, 1) / 255.0
        else:
            ref = video[0]
        return {"pixel_values": video * 2 - 1, "pose": pose, "reference": ref.float() * 2 - 1}


def collate_video(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class StepBatchSampler(torch.utils.data.Sampler):
    """Per-process batches of ``(clip_index, sample_seed)`` for optimisation steps ``start_step`` onwards.

    The global order is a shuffle per epoch seeded by (seed, epoch); a global batch of ``batch_size *
    num_processes * accumulation`` samples is split across processes and micro-steps. Only the step number and the
    seed decide what is read, so resuming at step N reads what an uninterrupted run would have.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        max_steps: int,
        start_step: int = 0,
        accumulation: int = 1,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.max_steps, self.start_step, self.accumulation = max_steps, start_step, accumulation
        self.process_index, self.num_processes = process_index, num_processes

    def _global_position(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_items)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return int(order[offset]), position

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_step = self.batch_size * self.num_processes * self.accumulation
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.accumulation):
                first = step * per_step + (micro * self.num_processes + self.process_index) * self.batch_size
                batch = []
                for pos in range(first, first + self.batch_size):
                    index, _ = self._global_position(pos)
                    seed = int(np.random.SeedSequence([self.seed, pos]).generate_state(1)[0])
                    batch.append((index, seed))
                yield batch

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation
