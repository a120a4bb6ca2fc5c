"""Video training: EDM schedule and weighting, the clip dataset and its order, a tiny run with resume."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from controlnext.pipelines.svd import StableVideoDiffusionControlNeXtPipeline
from controlnext.testing import tiny_svd_components
from controlnext.testing.video import make_synthetic_video_dataset
from controlnext.training.video import (
    StepBatchSampler,
    VideoPoseDataset,
    VideoTrainConfig,
    edm_loss,
    edm_scalings,
    find_clips,
    sample_sigmas,
    train_video,
)
from controlnext.training.video.__main__ import main as train_main
from controlnext.video_io import write_video


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ---------------------------------------------------------------------- EDM
def test_edm_scalings_are_the_svd_preconditioning():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    k = edm_scalings(sigma)
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(k.c_in, 1 / (s**2 + 1).sqrt())
    torch.testing.assert_close(k.c_skip, 1 / (s**2 + 1))
    torch.testing.assert_close(k.c_out, -s / (s**2 + 1).sqrt())
    torch.testing.assert_close(k.c_noise, 0.25 * sigma.log())
    torch.testing.assert_close(k.weight, (1 + s**2) / s**2)
    # c_skip^2 + c_out^2 = 1: unit-variance output for unit-variance data (EDM with sigma_data = 1).
    torch.testing.assert_close(k.c_skip**2 * (1 + s**2) + k.c_out**2, torch.ones_like(s))


def test_edm_loss_is_zero_for_the_ideal_prediction_and_weighted_otherwise():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 3, 4, 5, 5, generator=gen)
    sigma = torch.tensor([0.3, 4.0])
    noisy = clean + sigma.view(-1, 1, 1, 1, 1) * torch.randn(clean.shape, generator=gen)
    k = edm_scalings(sigma)
    ideal = (clean - k.c_skip * noisy) / k.c_out
    assert edm_loss(ideal, noisy, clean, sigma).item() < 1e-10
    off = ideal + 0.1  # denoised is off by c_out * 0.1 everywhere
    expected = ((k.weight * (k.c_out * 0.1) ** 2).flatten()).mean()
    torch.testing.assert_close(edm_loss(off, noisy, clean, sigma), expected.float(), rtol=1e-4, atol=1e-6)


def test_noise_level_distributions():
    # Cosine-interpolated: the release's range [0.002, 700]; u -> sigma is decreasing.
    many = sample_sigmas(_gens(2000))
    assert many.min() >= 0.002 * 0.999 and many.max() <= 700 * 1.001
    median = many.median().item()
    assert 0.1 < median < 10, median
    lognormal = sample_sigmas(_gens(4000), "lognormal")
    assert abs(lognormal.log().mean().item() - 0.7) < 0.1 and abs(lognormal.log().std().item() - 1.6) < 0.1
    # A known point: u = 0.5 with equal noise_d values is the plain cosine schedule's midpoint.
    u = torch.rand((), generator=_gens(1, 7)[0]).item()
    sigma = sample_sigmas(_gens(1, 7), noise_d_low=64, noise_d_high=64, sigma_data=1.0).item()
    t_min, t_max = math.atan(math.exp(-0.5 * -2 * math.log(700))), math.atan(math.exp(-0.5 * -2 * math.log(0.002)))
    assert sigma == pytest.approx(math.tan(t_min + u * (t_max - t_min)), rel=1e-5)
    with pytest.raises(ValueError, match="cosine_interpolated"):
        sample_sigmas(_gens(1), "uniform")


# ---------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_video_dataset(tmp_path_factory.mktemp("video_data") / "data", clips=2, frames=8)


def test_dataset_samples_frames_poses_and_reference(data_root, tmp_path):
    ds = VideoPoseDataset(data_root, 64, 48, num_frames=3, sample_stride=2)
    assert len(ds) == 2 and ds.span == 5
    a = ds[(0, 123)]
    assert a["pixel_values"].shape == (3, 3, 48, 64) and a["pose"].shape == (3, 3, 48, 64)
    assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1 and a["pose"].min() >= 0
    torch.testing.assert_close(a["reference"], a["pixel_values"][0])  # default reference: first sampled frame
    torch.testing.assert_close(ds[(0, 123)]["pose"], a["pose"])  # the seed decides the start frame
    assert len({round(ds[(1, s)]["pose"].sum().item(), 3) for s in range(8)}) > 1  # other seeds, other starts
    # The frames-folder form reads the same way.
    png = make_synthetic_video_dataset(tmp_path / "png", clips=1, frames=6, as_video=False)
    ref = np.full((48, 64, 3), 200, np.uint8)
    PIL.Image.fromarray(ref).save(png / "clip_0000" / "reference.png")
    b = VideoPoseDataset(png, 64, 48, num_frames=6, sample_stride=1)[(0, 0)]
    assert b["pixel_values"].shape[0] == 6
    torch.testing.assert_close(b["reference"], torch.full((3, 48, 64), 200 / 255 * 2 - 1))


def test_dataset_layout_errors_name_the_clip(tmp_path):
    root = make_synthetic_video_dataset(tmp_path / "d", clips=1, frames=6)
    write_video([np.zeros((16, 16, 3), np.uint8)] * 4, root / "clip_0000" / "pose.mp4")
    (root / "clip_0001").mkdir()
    write_video([np.zeros((16, 16, 3), np.uint8)] * 4, root / "clip_0001" / "video.mp4")
    with pytest.raises(ValueError) as err:
        find_clips(root)
    assert "clip_0000: 6 video frames but 4 pose frames" in str(err.value)
    assert "clip_0001: no pose.* or poses/" in str(err.value)
    ok = make_synthetic_video_dataset(tmp_path / "short", clips=1, frames=4)
    with pytest.raises(ValueError, match="fewer than the 7"):
        VideoPoseDataset(ok, 64, 64, num_frames=4, sample_stride=2)
    with pytest.raises(FileNotFoundError):
        find_clips(tmp_path / "nope")


def test_batch_order_depends_only_on_the_step():
    full = list(StepBatchSampler(5, 2, seed=3, max_steps=6))
    resumed = list(StepBatchSampler(5, 2, seed=3, max_steps=6, start_step=4))
    assert resumed == full[4:]
    # Two processes with half the batch each read the same global batch as one process.
    halves = [list(StepBatchSampler(5, 1, seed=3, max_steps=6, process_index=i, num_processes=2)) for i in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full
    order = [i for batch in full for i, _ in batch]
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))  # each epoch visits every clip once
    assert len({seed for batch in full for _, seed in batch}) == 12  # and every sample gets its own seed


# ---------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd_base")
    StableVideoDiffusionPipeline(**tiny_svd_components()).save_pretrained(root / "base")
    return root / "base"


def _cfg(base_dir, data_root, out, **kw):
    return VideoTrainConfig(
        pretrained_model=str(base_dir), dataset=str(data_root), output_dir=str(out), width=64, height=64,
        num_frames=4, sample_stride=1, controlnext_config="tiny", learning_rate=1e-3, unet_learning_rate=1e-3, **kw,
    )  # fmt: skip


def test_training_runs_loss_falls_resume_matches_and_outputs_load(base_dir, data_root, tmp_path):
    full = train_video(_cfg(base_dir, data_root, tmp_path / "a", max_train_steps=6, checkpointing_steps=3))
    assert full.global_step == 6 and len(full.losses) == 6
    assert all(math.isfinite(x) for x in full.losses)
    before, after = full.probe_losses
    assert after < 0.9 * before, full.probe_losses  # the same batch and noise: training lowered the loss
    assert len(full.unet_names) == len(list(full.unet.parameters()))  # as published: the whole UNet trains

    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "checkpoint.json").is_file()
    resumed = train_video(
        _cfg(base_dir, data_root, tmp_path / "b", max_train_steps=6, resume_from_checkpoint=str(checkpoint))
    )
    assert resumed.global_step == 6 and resumed.probe_losses is None
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)  # the first 3 come from the checkpoint
    for (name, a), b in zip(full.controlnext.state_dict().items(), resumed.controlnext.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(ValueError, match="different data settings"):
        train_video(
            _cfg(base_dir, data_root, tmp_path / "c", max_train_steps=6, resume_from_checkpoint=str(checkpoint), seed=1)
        )

    # The outputs are what `controlnext video` loads.
    pipe = StableVideoDiffusionControlNeXtPipeline.from_published(
        str(base_dir), full.files["controlnext"], unet_weights=full.files["unet"]
    )
    for name, p in pipe.unet.named_parameters():
        torch.testing.assert_close(p, dict(full.unet.named_parameters())[name].float(), msg=name)
    pipe.set_progress_bar_config(disable=True)
    poses = [PIL.Image.new("RGB", (64, 64))] * 3
    assert len(pipe(PIL.Image.new("RGB", (64, 64)), poses, num_inference_steps=1).frames[0]) == 3


def test_control_only_training_saves_deltas_and_cli_errors(base_dir, data_root, tmp_path, capsys):
    run = train_video(
        _cfg(
            base_dir,
            data_root,
            tmp_path / "d",
            max_train_steps=1,
            train_unet=["none"],
            probe_loss=False,
            checkpointing_steps=None,
        )  # fmt: skip
    )
    assert run.unet_names == [] and "unet" not in run.files and (tmp_path / "d" / "controlnext.safetensors").is_file()
    code = train_main(["--pretrained-model", str(base_dir), "--dataset", str(tmp_path / "missing")])
    assert code == 2 and "Video dataset folder not found" in capsys.readouterr().err


def test_config_refuses_non_finite_rates_and_oversized_frames(tmp_path):
    for kw, message in [
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number, got inf"),
        (dict(unet_learning_rate=float("nan")), "unet_learning_rate must be a finite number, got nan"),
        (dict(learning_rate=5.0), r"learning_rate must be in \[0, 1\], got 5.0"),
        (dict(adam_epsilon=0.0), r"adam_epsilon must be in \(0, 1\]"),
        (dict(width=100000), "width must be at most 4096, got 100000"),
    ]:
        with pytest.raises(ValueError, match=message):
            VideoTrainConfig(pretrained_model="base", dataset="data", **kw).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on the CPU only")
def test_fp16_on_the_cpu_is_refused_before_loading(tmp_path):
    cfg = VideoTrainConfig(pretrained_model=str(tmp_path / "no-base"), dataset="d", output_dir=str(tmp_path / "o"),
                           mixed_precision="fp16")  # fmt: skip
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a GPU"):
        train_video(cfg)


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(base_dir, data_root, tmp_path, monkeypatch):
    from controlnext.training import checkpoint as ckpt
    from controlnext.training.video import loop

    real, calls = loop.edm_loss, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(loop, "edm_loss", nan_at_step_3)
    out = tmp_path / "nan"
    cfg = _cfg(base_dir, data_root, out, max_train_steps=4, checkpointing_steps=2, probe_loss=False)
    with pytest.raises(ValueError, match=r"loss is nan at step 3.*checkpoint-2"):
        train_video(cfg)
    root = out / "checkpoints"
    assert ckpt.latest_checkpoint(root) == root / "checkpoint-2" and not (root / "checkpoint-3").exists()
    assert not (out / "controlnext.safetensors").exists()


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom controlnext.training.checkpoint import lock_output_dir\n"
         f"with lock_output_dir({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = VideoTrainConfig(pretrained_model=str(tmp_path / "base"), dataset="d", output_dir=str(out))
        with pytest.raises(ValueError, match="is in use by another training run"):
            train_video(cfg)
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_learning_rates_reach_their_groups_and_changed_settings_resume_only_when_allowed(
    base_dir, data_root, tmp_path, monkeypatch, caplog
):
    import dataclasses
    import logging

    from controlnext.training.video import loop

    real, rates = loop.parameter_groups, []

    def recording(*args):
        groups = real(*args)
        rates.append({g["name"]: g["lr"] for g in groups})
        return groups

    monkeypatch.setattr(loop, "parameter_groups", recording)

    def cfg(**kw):
        # _cfg's learning_rate 1e-3 is the module's; the UNet's is set apart here to tell the two groups apart
        return dataclasses.replace(
            _cfg(base_dir, data_root, tmp_path / "a", checkpointing_steps=1, probe_loss=False, **kw),
            unet_learning_rate=2e-4,
        )

    train_video(cfg(max_train_steps=1))
    assert rates == [{"control": 1e-3, "unet": 2e-4}]  # --learning-rate is the module's, as in `controlnext train`

    again = dict(max_train_steps=2, resume_from_checkpoint="latest", seed=1)
    with pytest.raises(ValueError, match=r"different data settings \(seed: 0 -> 1\).*--allow-changed-settings"):
        train_video(cfg(**again))
    with caplog.at_level(logging.WARNING, logger="controlnext.train"):
        run = train_video(cfg(allow_changed_settings=True, **again))
    assert run.global_step == 2 and "seed: 0 -> 1" in caplog.text
