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
