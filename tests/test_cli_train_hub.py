"""`controlnext train --push-to-hub / --hub-model-id` (checked before training, never touching the network here) and
`--attention-backend`."""

from __future__ import annotations

import pytest

from controlnext.cli import main


@pytest.fixture()
def fake_train(monkeypatch, tmp_path):
    """`controlnext train` with the training replaced by writing one output file; the configs it was called with."""
    import controlnext.training as training

    seen = []

    def train(cfg):
        seen.append(cfg)
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "controlnext.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(training, "train", train)
    (tmp_path / "data").mkdir()
    argv = ["train", "--model", "demo", "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]
    return seen, argv


@pytest.fixture()
def hub(monkeypatch):
    """huggingface_hub online with a token, its upload functions recorded instead of called."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw)) or
                        type("Url", (), {"repo_id": repo if "/" in repo else f"me/{repo}"})())  # fmt: skip
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    return calls


def test_push_to_hub_offline_fails_in_one_line_before_training(fake_train, monkeypatch, capsys):
    from huggingface_hub import constants

    seen, argv = fake_train
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([*argv, "--push-to-hub"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--push-to-hub needs the hub, but HF_HUB_OFFLINE is set" in line and "hf upload" in line
    assert seen == []  # nothing was trained


def test_push_to_hub_without_a_token_fails_before_training(fake_train, hub, monkeypatch, capsys):
    import huggingface_hub

    seen, argv = fake_train
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main([*argv, "--push-to-hub"]) == 2
    assert "hf auth login" in capsys.readouterr().err and seen == [] and hub == []


def test_push_to_hub_uploads_the_outputs_after_training(fake_train, hub, tmp_path, capsys):
    seen, argv = fake_train
    assert main([*argv, "--push-to-hub", "--hub-model-id", "me/shapes-edges"]) == 0
    (cfg,) = seen
    assert cfg.push_to_hub and cfg.hub_model_id == "me/shapes-edges"
    (create, upload) = hub
    assert create[:2] == ("create", "me/shapes-edges")
    assert upload[1]["repo_id"] == "me/shapes-edges" and upload[1]["folder_path"] == str(tmp_path / "run")
    assert "checkpoints/**" in upload[1]["ignore_patterns"]
    assert "uploaded to https://huggingface.co/me/shapes-edges" in capsys.readouterr().out
    # without --hub-model-id the repository is named after the output folder, as diffusers' scripts do
    assert main([*argv, "--push-to-hub"]) == 0
    assert hub[2][:2] == ("create", "run")
    # without --push-to-hub nothing is uploaded
    assert main(argv) == 0 and len(hub) == 4


def test_attention_backend_is_applied_to_the_trained_unet(sd15, shapes, tmp_path, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor

    import controlnext.training.loop as loop
    from controlnext.training import parse_train_args, train

    seen = []

    def record(unet, backend):
        loop_set(unet, backend)
        seen.append((backend, {type(p) for p in unet.attn_processors.values()}))

    loop_set = loop.set_attention_backend
    monkeypatch.setattr(loop, "set_attention_backend", record)
    args = ["--model", str(sd15), "--dataset", str(shapes), "--output-dir", str(tmp_path / "run"), "--resolution",
            "64", "--controlnext-config", "tiny", "--train-batch-size", "2", "--train-unet", "none", "--cpu-threads",
            "1", "--report-to", "none", "--max-train-steps", "1"]  # fmt: skip
    train(parse_train_args([*args, "--attention-backend", "eager"]))
    assert seen == [("eager", {AttnProcessor})]
    train(parse_train_args([*args, "--output-dir", str(tmp_path / "run2")]))  # the default leaves diffusers' choice
    assert len(seen) == 1


def test_attention_backends_that_cannot_run_here_say_what_they_need():
    import importlib.util

    import torch

    from controlnext.attention import set_attention_backend
    from controlnext.testing.models import tiny_unet

    with pytest.raises(ValueError, match="one of sdpa, xformers, npu-flash, eager"):
        set_attention_backend(tiny_unet("sd15"), "flash")
    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers runs on this machine; the message for a machine without it cannot be shown")
    with pytest.raises(ValueError, match="pip install xformers"):
        set_attention_backend(tiny_unet("sd15"), "xformers")


# ---------------------------------------------------------------------- train-video takes the same options
HUB_OPTIONS = ("attention_backend", "push_to_hub", "hub_model_id")


def _subparser(name: str):
    import argparse

    from controlnext.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_train_video_has_trains_hub_and_attention_options(tmp_path):
    from controlnext.training.video.config import video_config_from_args

    helps = {}
    for command in ("train", "train-video"):
        actions = {a.dest: a for a in _subparser(command)._actions}
        helps[command] = {d: (actions[d].option_strings, actions[d].help, actions[d].choices) for d in HUB_OPTIONS}
    assert helps["train"] == helps["train-video"]  # one declaration: the same flags, help and choices
    args = _subparser("train-video").parse_args(
        ["--model", str(tmp_path), "--dataset", str(tmp_path), "--push-to-hub", "--hub-model-id", "me/dance",
         "--attention-backend", "eager"]
    )  # fmt: skip
    cfg = video_config_from_args(args)
    assert (cfg.push_to_hub, cfg.hub_model_id, cfg.attention_backend) == (True, "me/dance", "eager")
    default = video_config_from_args(_subparser("train-video").parse_args(["--model", str(tmp_path), "--dataset", "d"]))
    assert (default.push_to_hub, default.hub_model_id, default.attention_backend) == (False, None, "sdpa")
    with pytest.raises(SystemExit):
        _subparser("train-video").parse_args(["--model", "m", "--dataset", "d", "--attention-backend", "flash"])


@pytest.fixture()
def fake_train_video(monkeypatch, tmp_path):
    """`controlnext train-video` with the training replaced by writing one output file; the configs it got."""
    import controlnext.training.video.loop as loop

    seen = []

    def train_video(cfg):
        seen.append(cfg)
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "controlnext.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(loop, "train_video", train_video)
    (tmp_path / "base").mkdir()
    argv = ["train-video", "--model", str(tmp_path / "base"), "--dataset", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    return seen, argv


def test_train_video_push_is_checked_before_training_and_made_after(
    fake_train, fake_train_video, hub, monkeypatch, capsys
):
    from huggingface_hub import constants

    seen, argv = fake_train_video
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([*argv, "--push-to-hub"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert seen == []  # nothing was trained
    assert main([*fake_train[1], "--push-to-hub"]) == 2  # the same output folder: train says the same line
    message = capsys.readouterr().err.strip().split(": error: ", 1)[1]
    assert line == f"controlnext train-video: error: {message}" and "HF_HUB_OFFLINE is set" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert main([*argv, "--push-to-hub", "--hub-model-id", "me/dance"]) == 0
    assert len(seen) == 1 and [c[:2] for c in hub if c[0] == "create"] == [("create", "me/dance")]
    assert "uploaded to https://huggingface.co/me/dance" in capsys.readouterr().out


def test_train_video_applies_the_attention_backend(tmp_path):
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from controlnext.testing import tiny_svd_components
    from controlnext.testing.video import make_synthetic_video_dataset
    from controlnext.training.video import VideoTrainConfig, train_video

    StableVideoDiffusionPipeline(**tiny_svd_components()).save_pretrained(tmp_path / "base")
    data = make_synthetic_video_dataset(tmp_path / "data", clips=1, frames=4)

    def run(out: str, **kw):
        cfg = VideoTrainConfig(
            pretrained_model=str(tmp_path / "base"), dataset=str(data), output_dir=str(tmp_path / out), width=64,
            height=64, num_frames=2, sample_stride=1, controlnext_config="tiny", max_train_steps=1, probe_loss=False,
            checkpointing_steps=None, train_unet=["none"], **kw,
        )  # fmt: skip
        return {type(p) for p in train_video(cfg).unet.attn_processors.values()}

    assert run("eager", attention_backend="eager") == {AttnProcessor}
    assert run("default") == {AttnProcessor2_0}  # sdpa leaves diffusers' choice


def test_train_starts_from_a_demo_module_name(fake_train):
    from controlnext.shapes.demo import demo_assets

    seen, argv = fake_train
    assert main([*argv, "--controlnext", "demo:mask"]) == 0
    assert seen[0].controlnext == str(demo_assets() / "mask" / "controlnext.safetensors")
