"""`controlnext video` end to end on tiny models, and its errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from controlnext.cli import main
from controlnext.loading import save_controlnext_file
from controlnext.testing import tiny_svd_components
from controlnext.testing.models import tiny_controlnext
from controlnext.video_io import read_video, write_video


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cli")
    StableVideoDiffusionPipeline(**tiny_svd_components()).save_pretrained(root / "base")
    save_controlnext_file(tiny_controlnext("svd-v2"), root / "controlnext.safetensors")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray((rng.random((80, 100, 3)) * 255).astype(np.uint8)).save(root / "ref.png")
    write_video([np.full((64, 64, 3), 25 * i, np.uint8) for i in range(10)], root / "poses.mp4", fps=14)
    (root / "bad.mp4").write_text("not a video")
    return root


def _args(assets, *extra):
    return [
        "video",
        "--model", str(assets / "base"),
        "--controlnext", str(assets / "controlnext.safetensors"),
        "--reference", str(assets / "ref.png"),
        "--width", "64", "--height", "64", "--steps", "2",
        "--frames-per-batch", "3", "--overlap", "1", "--device", "cpu",
        *extra,
    ]  # fmt: skip


def test_pose_video_to_mp4_with_progress(assets, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(_args(assets, "--pose-video", str(assets / "poses.mp4"), "--max-frames", "4", "-o", str(out),
                      "--save-poses", str(tmp_path / "poses.gif")))  # fmt: skip
    assert code == 0
    clip = read_video(out)
    assert len(clip) == 4 and clip.size == (64, 64)
    assert clip.fps == pytest.approx(7)  # the pose video's 14 fps at the default stride of 2
    assert len(read_video(tmp_path / "poses.gif")) == 4
    err = capsys.readouterr().err
    assert "window 2/2" in err and "step 2/2" in err  # 4 frames in windows of 3 with overlap 1: two windows


def test_frames_folder_output_and_reference_pose(assets, tmp_path):
    out = tmp_path / "frames"
    ref_pose = tmp_path / "ref_pose.png"
    PIL.Image.new("RGB", (64, 64)).save(ref_pose)
    code = main(_args(assets, "--pose-video", str(assets / "poses.mp4"), "--sample-stride", "3",
                      "--reference-pose", str(ref_pose), "-o", str(out)))  # fmt: skip
    assert code == 0
    assert len(list(out.glob("frame_*.png"))) == 5  # the reference pose + frames 0, 3, 6, 9


def test_cli_errors(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CONTROLNEXT_DWPOSE_DIR", raising=False)
    out = str(tmp_path / "o.mp4")
    assert main(_args(assets, "--driving-video", str(assets / "poses.mp4"), "-o", out)) == 2
    assert "yolox_l.onnx and dw-ll_ucoco_384.onnx" in capsys.readouterr().err
    assert (
        main(_args(assets, "--driving-video", str(assets / "poses.mp4"), "--dwpose-dir", str(tmp_path), "-o", out)) == 2
    )
    assert "missing" in capsys.readouterr().err
    assert main(_args(assets, "--pose-video", str(assets / "bad.mp4"), "-o", out)) == 2
    assert "Could not read the video" in capsys.readouterr().err
    assert main(_args(assets, "--pose-video", str(tmp_path / "none.mp4"), "-o", out)) == 2
    assert "video not found" in capsys.readouterr().err
    assert main([*_args(assets, "--pose-video", str(assets / "poses.mp4"), "-o", out), "--width", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main([*_args(assets, "--pose-video", str(assets / "poses.mp4"), "-o", out), "--overlap", "3"]) == 2
    assert "--overlap" in capsys.readouterr().err


def test_driving_video_poses_are_detected_aligned_and_drawn(assets, tmp_path, monkeypatch):
    """The --driving-video path with a stand-in detector (the ONNX models are not available offline)."""
    import controlnext.pose as pose_pkg
    from controlnext.pose import PoseFrame

    body = np.array([[0.5, 0.2 + 0.03 * i] for i in range(18)])

    def frame_pose(shift: float) -> PoseFrame:
        kp, sc = np.zeros((1, 134, 2)), np.zeros((1, 134))
        kp[0, :18], sc[0, :18] = body * [1.0, 0.5] + [shift, 0.1], 0.9
        return PoseFrame.from_wholebody(kp, sc)

    calls = []

    class FakeDetector:
        def __init__(self, model_dir=None):
            calls.append(model_dir)
            self.seen = 0

        def __call__(self, image):
            self.seen += 1  # the reference image comes first, then the driving frames
            return frame_pose(0.0 if self.seen == 1 else 0.05)

    monkeypatch.setattr(pose_pkg, "DWPoseDetector", FakeDetector)
    poses_out = tmp_path / "poses"
    args = ["--driving-video", str(assets / "poses.mp4"), "--dwpose-dir", str(tmp_path), "--max-frames", "3"]
    args += ["--pose-supersample", "0"]  # at 64 px, strokes drawn at 2160 px would vanish in the resize
    code = main(_args(assets, *args, "--save-poses", str(poses_out), "-o", str(tmp_path / "out.gif")))
    assert code == 0 and calls[0] == str(tmp_path)
    assert len(read_video(tmp_path / "out.gif")) == 3
    drawn = sorted(poses_out.glob("*.png"))
    assert len(drawn) == 3 and np.asarray(PIL.Image.open(drawn[0])).any()  # the reference pose comes first
