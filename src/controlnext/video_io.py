"""Reading and writing videos: mp4/mov/webm/avi through imageio's ffmpeg backend, gif, and folders of frames.

Frames are handled as RGB ``uint8`` arrays of shape (H, W, 3). The ffmpeg binary comes from the ``imageio-ffmpeg``
wheel (PyPI), so nothing has to be installed system-wide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VideoClip",
    "count_frames",
    "iter_frames",
    "read_video",
    "resize_and_center_crop",
    "to_uint8_frames",
    "write_video",
]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v", ".gif")
# Containers that cannot hold H.264 get a codec they can.
_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class VideoClip:
    """Decoded frames (RGB uint8, each (H, W, 3)) and the frame rate they play at (after any stride)."""

    frames: list[np.ndarray]
    fps: float

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return self.frames[0].shape[:2]

    def __len__(self) -> int:
        return len(self.frames)


def _natural_key(name: str) -> list:
    # "frame_2.png" sorts before "frame_10.png".
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"The folder {folder} holds no image frames (expected files ending in {IMAGE_EXTENSIONS}).")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    if frame.shape[-1] == 4:
        frame = frame[..., :3]
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def _source_fps(path: Path) -> float:
    if path.is_dir():
        return 0.0
    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        duration = iio.immeta(path).get("duration") or 0
        return 1000.0 / duration if duration else 0.0
    import imageio.v2 as iio2

    with iio2.get_reader(str(path), format="ffmpeg") as reader:
        return float(reader.get_meta_data().get("fps") or 0.0)


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield every frame of a video file or a folder of images, in order, as RGB uint8 (H, W, 3) arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Video not found: {path}")
    try:
        if path.is_dir():
            for file in _frame_files(path):
                with PIL.Image.open(file) as im:
                    yield _as_rgb(np.asarray(im.convert("RGB")))
        elif path.suffix.lower() == ".gif":
            import imageio.v3 as iio

            for frame in iio.imiter(path):
                yield _as_rgb(frame)
        else:
            import imageio.v2 as iio2

            with iio2.get_reader(str(path), format="ffmpeg") as reader:
                for frame in reader:
                    yield _as_rgb(frame)
    except (OSError, RuntimeError, IndexError, PIL.UnidentifiedImageError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # not ffmpeg's banner
        raise ValueError(
            f"Could not read the video {path} ({reason}). Expected a video file ({', '.join(VIDEO_EXTENSIONS)}) "
            "or a folder of image frames."
        ) from err


def count_frames(path: str | Path) -> int:
    """Number of frames of a video file or folder of images (decodes the stream for files whose header lacks it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Video not found: {path}")
    if path.is_dir():
        return len(_frame_files(path))
    if path.suffix.lower() == ".gif":
        return sum(1 for _ in iter_frames(path))
    import imageio.v2 as iio2

    try:
        with iio2.get_reader(str(path), format="ffmpeg") as reader:
            return int(reader.count_frames())
    except (OSError, RuntimeError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Could not read the video {path} ({reason}).") from err


def read_video(path: str | Path, *, stride: int = 1, max_frames: int | None = None, start: int = 0) -> VideoClip:
    """Read frames ``start, start+stride, ...`` (at most ``max_frames``) of a video file or folder of frames.

    The returned ``fps`` is the source rate divided by ``stride`` (0 when unknown, e.g. for a folder).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}.")
    path = Path(path)
    frames: list[np.ndarray] = []
    for i, frame in enumerate(iter_frames(path)):
        if i < start or (i - start) % stride:
            continue
        if frames and frame.shape != frames[0].shape:
            raise ValueError(
                f"Frame {i} of {path} is {frame.shape[1]}x{frame.shape[0]} but earlier frames are "
                f"{frames[0].shape[1]}x{frames[0].shape[0]}; all frames of a video must have one size."
            )
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    if not frames:
        raise ValueError(f"The video {path} has no frames" + (f" from frame {start} on." if start else "."))
    return VideoClip(frames=frames, fps=_source_fps(path) / stride)


def to_uint8_frames(frames) -> list[np.ndarray]:
    """Convert frames to a list of RGB uint8 (H, W, 3) arrays.

    Accepts a list of PIL images or arrays, a numpy array (F, H, W, C) (uint8, or float in [0, 1]), or a tensor
    (F, C, H, W) / (F, H, W, C) in [0, 1].
    """
    if isinstance(frames, torch.Tensor):
        t = frames.detach().float().cpu()
        if t.dim() != 4:
            raise ValueError(f"A frames tensor must be 4-D (F, C, H, W); got shape {tuple(t.shape)}.")
        if t.shape[1] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(0, 2, 3, 1)
        frames = (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"A frames array must be 4-D (F, H, W, C); got shape {frames.shape}.")
        frames = list(frames)
    out = []
    for i, frame in enumerate(frames):
        if isinstance(frame, PIL.Image.Image):
            arr = np.asarray(frame.convert("RGB"))
        else:
            arr = np.asarray(frame)
            if arr.dtype != np.uint8:
                if arr.dtype.kind == "f":
                    arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0)
                arr = arr.astype(np.uint8)
        if arr.ndim not in (2, 3):
            raise ValueError(f"Frame {i} has shape {arr.shape}; expected (H, W, 3).")
        out.append(_as_rgb(arr))
    if not out:
        raise ValueError("No frames to convert.")
    return out


def write_video(frames: Sequence | Iterable, path: str | Path, fps: float = 7.0, quality: float = 8.0) -> Path:
    """Write frames to ``path``: ``.gif`` through Pillow, other extensions through ffmpeg (H.264; VP9 for ``.webm``).

    ``frames``: anything :func:`to_uint8_frames` accepts. ``quality``: ffmpeg quality 0-10 (mp4 only).
    Returns the path written.
    """
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    suffix = path.suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise ValueError(f"Cannot write {path}: use one of {', '.join(VIDEO_EXTENSIONS)}.")
    arrays = to_uint8_frames(list(frames) if not isinstance(frames, (np.ndarray, torch.Tensor)) else frames)
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"Frame {i} has shape {a.shape} but frame 0 has {shape}; all frames need one size.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        import imageio.v3 as iio

        iio.imwrite(path, np.stack(arrays), duration=1000.0 / fps, loop=0)
        return path
    import imageio.v2 as iio2

    # H.264 in yuv420p needs even sizes: pad odd sizes by one edge pixel rather than resampling.
    h, w = shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    codec = _CODECS.get(suffix, "libx264")
    writer = iio2.get_writer(
        str(path), format="ffmpeg", fps=fps, codec=codec, pixelformat="yuv420p", quality=quality, macro_block_size=1
    )
    try:
        for a in arrays:
            writer.append_data(np.pad(a, pad, mode="edge") if (h % 2 or w % 2) else a)
    finally:
        writer.close()
    return path


def resize_and_center_crop(image: np.ndarray | PIL.Image.Image, width: int, height: int) -> np.ndarray:
    """Scale ``image`` to cover ``width`` x ``height`` keeping its aspect ratio, then crop the centre (RGB uint8).

    This is how the published video pipeline prepares the reference image before pose detection and generation.
    """
    if width < 1 or height < 1:
        raise ValueError(f"Target size must be positive, got {width}x{height}.")
    img = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(to_uint8_frames([image])[0])
    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), PIL.Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.array(img.crop((left, top, left + width, top + height)))
