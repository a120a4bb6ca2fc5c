"""Video reading and writing (imageio + ffmpeg from PyPI), frame folders, and clear errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from controlnext.video_io import read_video, resize_and_center_crop, to_uint8_frames, write_video


def _frames(n=6, h=48, w=64):
    # Flat colours survive lossy coding well enough to check frame order.
    return [np.full((h, w, 3), 20 * i + 10, dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webm"])
def test_write_then_read_round_trip(tmp_path, suffix):
    frames = _frames()
    path = write_video(frames, tmp_path / f"clip{suffix}", fps=8)
    clip = read_video(path)
    assert len(clip) == 6 and clip.size == (48, 64)
    assert clip.fps == pytest.approx(8, rel=0.05)
    means = [f.mean() for f in clip.frames]
    np.testing.assert_allclose(means, [20 * i + 10 for i in range(6)], atol=4)


def test_stride_max_frames_and_fps(tmp_path):
    path = write_video(_frames(9), tmp_path / "clip.mp4", fps=10)
    clip = read_video(path, stride=2, max_frames=3)
    assert len(clip) == 3 and clip.fps == pytest.approx(5)
    np.testing.assert_allclose([f.mean() for f in clip.frames], [10, 50, 90], atol=4)
    assert len(read_video(path, start=7)) == 2


def test_folder_of_frames_in_natural_order(tmp_path):
    for i, f in enumerate(_frames(11)):
        PIL.Image.fromarray(f).save(tmp_path / f"frame_{i}.png")
    clip = read_video(tmp_path)
    assert [int(f[0, 0, 0]) for f in clip.frames] == [20 * i + 10 for i in range(11)]  # frame_10 after frame_9
    assert clip.fps == 0


def test_odd_sizes_tensors_and_floats_are_written(tmp_path):
    video = torch.rand(3, 3, 33, 47)
    clip = read_video(write_video(video, tmp_path / "odd.mp4"))
    assert len(clip) == 3 and clip.size == (34, 48)  # padded to even for H.264
    floats = to_uint8_frames(np.zeros((2, 5, 5, 3), dtype=np.float32) + 0.5)
    assert floats[0].dtype == np.uint8 and floats[0][0, 0, 0] == 128


def test_resize_and_center_crop_keeps_the_aspect_ratio():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[:, 90:110] = 255  # a vertical bar in the middle
    out = resize_and_center_crop(img, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 32].min() > 200 and out[:, 2].max() == 0  # the bar stays centred, not stretched


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="Video not found"):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("this is not a video")
    with pytest.raises(ValueError, match="Could not read the video"):
        read_video(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image frames"):
        read_video(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(mixed / "0.png")
    PIL.Image.new("RGB", (8, 6)).save(mixed / "1.png")
    with pytest.raises(ValueError, match="one size"):
        read_video(mixed)
    with pytest.raises(ValueError, match="use one of"):
        write_video(_frames(2), tmp_path / "clip.txt")
    with pytest.raises(ValueError, match="one size"):
        write_video([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 6, 3), np.uint8)], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="stride"):
        read_video(tmp_path / "mixed", stride=0)
