"""The training options: declared once on the config fields, one vocabulary for `train` and `train-video`, the
shared resume rule, path errors, the model card's base name and counts, and make-dataset re-runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re

import pytest

from controlnext.cli import main as cli_main
from controlnext.sources import is_local_path
from controlnext.training import TrainConfig, add_train_arguments, parse_train_args
from controlnext.training.checkpoint import check_resume_settings
from controlnext.training.export import write_model_card
from controlnext.training.video import VideoTrainConfig, add_video_train_arguments, video_config_from_args


def _parser(add) -> argparse.ArgumentParser:
    return add(argparse.ArgumentParser(prog="t"))


def _video(argv: list[str]) -> VideoTrainConfig:
    return video_config_from_args(_parser(add_video_train_arguments).parse_args(argv))


def _help(add) -> str:
    return re.sub(r"\s+", " ", _parser(add).format_help())


# ------------------------------------------------------------------------------------------------ declared once
@pytest.mark.parametrize(
    "cls, add", [(TrainConfig, add_train_arguments), (VideoTrainConfig, add_video_train_arguments)]
)
def test_every_field_is_one_generated_option_with_help_and_its_real_default(cls, add):
    parser = _parser(add)
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "command"]
    assert sorted(options) == sorted(fields)  # every setting has exactly one option, and nothing else is one
    for dest, action in options.items():
        assert action.help and action.help != argparse.SUPPRESS, dest
    text = _help(add)
    assert "(default: None)" not in text and "(default: detected). (default: auto)" not in text
    assert text.count("(default: ") > 20


def test_help_shows_the_dataclass_defaults():
    train, video = _help(add_train_arguments), _help(add_video_train_arguments)
    assert "Learning rate of the control module. (default: 1e-4)" in train
    assert "Learning rate of the control module. (default: 1e-5)" in video
    assert "--adam-epsilon ADAM_EPSILON AdamW epsilon. (default: 1e-8)" in train
    assert "--max-grad-norm MAX_GRAD_NORM Clip the gradient norm to this (0: no clipping). (default: 1)" in video
    assert "(default: off)" in train and "--center-crop, --no-center-crop" in train
    # the old spellings work (below) but are not advertised
    assert "--pretrained-model " not in train and "--control-learning-rate" not in video and "--save-unet " not in video


def test_parsed_options_equal_the_dataclass_defaults_when_not_given():
    cfg = parse_train_args(["--model", "base", "--dataset", "data"])
    assert cfg == dataclasses.replace(TrainConfig(pretrained_model="base", dataset="data"), command=cfg.command)
    assert _video(["--model", "b", "--dataset", "d"]) == VideoTrainConfig(pretrained_model="b", dataset="d")


# ------------------------------------------------------------------------------------------------ one vocabulary
def test_the_shared_options_have_one_spelling_default_and_meaning():
    train, video = TrainConfig(), VideoTrainConfig()
    for name in ("mixed_precision", "max_grad_norm", "save_unet_as", "unet_learning_rate", "allow_changed_settings"):
        assert getattr(train, name) == getattr(video, name), name
    assert (train.mixed_precision, train.max_grad_norm, train.save_unet_as) == ("no", 1.0, "values")
    flags = {}
    for add in (add_train_arguments, add_video_train_arguments):
        for a in _parser(add)._actions:
            flags.setdefault(a.dest, []).append((a.option_strings[0], a.help.split(" (default")[0]))
    for dest in ("pretrained_model", "learning_rate", "unet_learning_rate", "save_unet_as", "mixed_precision",
                 "max_grad_norm", "allow_changed_settings", "resume_from_checkpoint"):  # fmt: skip
        (train_flag, train_help), (video_flag, video_help) = flags[dest]
        assert train_flag == video_flag, dest
        if dest not in ("pretrained_model", "resume_from_checkpoint"):  # these describe each command's model/folders
            assert train_help == video_help, dest
    assert flags["pretrained_model"][0][0] == "--model"


def test_controlnext_config_is_one_parser_for_train_and_train_video(tmp_path):
    """'tiny' keeps the variant's number of residual blocks in both commands; JSON inline or in a file; anything
    else is one error naming what was expected."""
    from controlnext.models.variants import variant_config

    for variant in ("svd", "svd-v2"):
        tiny = _video(["--model", "m", "--dataset", "d", "--controlnext-variant", variant,
                       "--controlnext-config", "tiny"]).control_overrides()  # fmt: skip
        assert len(tiny["block_out_channels"]) == len(variant_config(variant)["block_out_channels"]), variant
    assert TrainConfig(controlnext_config="tiny", controlnext_variant="sd15").control_overrides() == (
        TrainConfig(controlnext_config="tiny").control_overrides("sd15")
    )
    (tmp_path / "c.json").write_text('{"mid_groups": 4}')
    from_file = _video(["--model", "m", "--dataset", "d", "--controlnext-config", str(tmp_path / "c.json")])
    assert from_file.control_overrides() == {"mid_groups": 4}
    for bad, expected in (("{oops", "could not parse"), ("[1, 2]", "JSON object of config fields")):
        with pytest.raises(ValueError, match=expected):
            _video(["--model", "m", "--dataset", "d", "--controlnext-config", bad]).control_overrides()
        with pytest.raises(ValueError, match=expected):
            TrainConfig(controlnext_config=bad).control_overrides()


def test_accelerate_launch_precision_is_the_default(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert TrainConfig().mixed_precision == VideoTrainConfig().mixed_precision == "bf16"
    assert parse_train_args(["--model", "b", "--dataset", "d", "--mixed-precision", "no"]).mixed_precision == "no"


def test_old_spellings_still_work_with_one_deprecation_line(capsys):
    cfg = parse_train_args(["--pretrained-model", "base", "--dataset", "data"])
    assert cfg.pretrained_model == "base"
    assert capsys.readouterr().err.strip() == "warning: --pretrained-model is deprecated, use --model."
    cfg = _video(["--pretrained-model", "b", "--dataset", "d", "--save-unet", "deltas",
                  "--control-learning-rate", "1e-3"])  # fmt: skip
    assert (cfg.pretrained_model, cfg.save_unet_as) == ("b", "deltas")
    assert (cfg.learning_rate, cfg.unet_learning_rate) == (1e-3, 1e-5)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [
        "warning: --pretrained-model is deprecated", "warning: --save-unet is deprecated",
        "warning: --control-learning-rate is deprecated",
    ]  # fmt: skip


def test_train_video_learning_rate_is_the_control_modules_and_the_old_meaning_is_never_silent(capsys):
    cfg = _video(["--model", "b", "--dataset", "d", "--learning-rate", "1e-3", "--unet-learning-rate", "2e-6"])
    assert (cfg.learning_rate, cfg.unet_learning_rate) == (1e-3, 2e-6) and capsys.readouterr().err == ""
    # Alone, --learning-rate used to set the UNet's rate: now it is the module's, and the UNet's rate is printed.
    cfg = _video(["--model", "b", "--dataset", "d", "--learning-rate", "1e-3"])
    assert (cfg.learning_rate, cfg.unet_learning_rate) == (1e-3, 1e-5)
    assert "the UNet trains at --unet-learning-rate 1e-05" in capsys.readouterr().err
    # The old pair (--learning-rate for the UNet, --control-learning-rate for the module) is refused.
    with pytest.raises(ValueError, match="--control-learning-rate is the old spelling of --learning-rate.*UNet's"):
        _video(["--model", "b", "--dataset", "d", "--learning-rate", "1e-5", "--control-learning-rate", "1e-3"])
    assert cli_main(["train-video", "--model", "b", "--dataset", "d", "--learning-rate", "1",
                     "--control-learning-rate", "1"]) == 2  # fmt: skip
    assert "controlnext train-video: error: --control-learning-rate is the old spelling" in capsys.readouterr().err


def test_old_python_field_names_are_an_error():
    with pytest.raises(TypeError):
        VideoTrainConfig(control_learning_rate=1e-3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        VideoTrainConfig(save_unet="deltas")  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------------------ resume rule
def test_changed_resume_settings_are_an_error_naming_each_change_or_a_warning_when_allowed(caplog):
    saved, now = dict(seed=0, train_batch_size=4, rows=8), dict(seed=1, train_batch_size=4, rows=6)
    with pytest.raises(ValueError) as info:
        check_resume_settings("ck", saved, now)
    message = str(info.value)
    assert "different data settings (seed: 0 -> 1, rows: 8 -> 6)" in message and "--allow-changed-settings" in message
    with caplog.at_level(logging.WARNING, logger="controlnext.train"):
        check_resume_settings("ck", saved, now, allow_changed=True)
    assert "seed: 0 -> 1" in caplog.text
    check_resume_settings("ck", saved, dict(saved))  # unchanged: nothing
    check_resume_settings("ck", {}, now)  # a checkpoint that records nothing (older format): nothing to compare


def test_train_resume_with_a_changed_seed_stops_unless_allowed(sd15, shapes, tmp_path, caplog):
    from controlnext.training import train

    out = tmp_path / "run"
    args = [
        "--model", str(sd15), "--dataset", str(shapes), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "4", "--train-unet", "none", "--cpu-threads", "1",
        "--report-to", "none", "--checkpointing-steps", "1",
    ]  # fmt: skip
    train(parse_train_args([*args, "--max-train-steps", "1"]))
    again = [*args, "--max-train-steps", "2", "--resume-from-checkpoint", "latest", "--seed", "1"]
    with pytest.raises(ValueError, match=r"different data settings \(seed: 0 -> 1\).*--allow-changed-settings"):
        train(parse_train_args(again))
    with caplog.at_level(logging.WARNING, logger="controlnext.train"):
        result = train(parse_train_args([*again, "--allow-changed-settings"]))
    assert result.global_step == 2 and "seed: 0 -> 1" in caplog.text


# ------------------------------------------------------------------------------------------------ path errors
def test_what_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("./base", "../base", "/abs/base", "~/base", "a/b/c", "a b/c d"):
        assert is_local_path(spec), spec
    for spec in ("owner/name", "stabilityai/stable-diffusion-xl-base-1.0", "mnist"):
        assert not is_local_path(spec), spec
    (tmp_path / "data").mkdir()
    assert is_local_path("data/nonexist")  # ./data is a folder here: a path, not user 'data' on the hub


def _one_error_line(err: str, command: str) -> str:
    # (library import warnings, e.g. transformers' torchvision notice, are another matter: not counted here)
    ours = [line for line in err.splitlines() if line.startswith("controlnext ")]
    assert len(ours) == 1 and ours[0].startswith(f"controlnext {command}: error: "), err
    assert "Traceback" not in err and "Name or service not known" not in err, err
    return ours[0]


def test_a_missing_base_model_path_is_one_line_in_train_train_video_and_eval(tmp_path, capsys):
    missing = str(tmp_path / "nonexist")
    assert cli_main(["train", "--model", missing, "--dataset", str(tmp_path)]) == 2
    train_line = _one_error_line(capsys.readouterr().err, "train")
    assert cli_main(["eval", "--base", missing, "--module", str(tmp_path / "m.safetensors")]) == 2
    eval_line = _one_error_line(capsys.readouterr().err, "eval")
    assert cli_main(["train-video", "--model", missing, "--dataset", str(tmp_path)]) == 2
    video_line = _one_error_line(capsys.readouterr().err, "train-video")
    expected = f"{missing}: no such folder, and not a hub id ('owner/name'); give the path of a diffusers model folder"
    assert f"--model {expected}" in train_line and f"--base {expected}" in eval_line
    assert f"--model {expected}" in video_line


def test_a_missing_dataset_path_is_never_sent_to_the_hub(sd15, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("data/nonexist", "./nonexist", str(tmp_path / "nonexist")):
        assert cli_main(["train", "--model", str(sd15), "--dataset", spec]) == 2
        line = _one_error_line(capsys.readouterr().err, "train")
        assert f"--dataset {spec} does not exist (no such file or folder); give an existing dataset" in line


# ------------------------------------------------------------------------------------------------ model card
def _card(tmp_path, base, steps, epochs) -> str:
    info = dict(
        base_model=base, family="sd15", variant="sd15", control_injection="cross_norm", steps=steps, epochs=epochs,
        dataset="d", rows=4, bad_rows=0, final_loss=0.1, loss_window=1, files={}, settings={}, command="c",
    )  # fmt: skip
    return write_model_card(tmp_path, info).read_text()


def test_model_card_names_the_base_without_local_paths_and_counts_in_words(tmp_path):
    local = tmp_path / "bases" / "my-base"
    local.mkdir(parents=True)
    card = _card(tmp_path, str(local), 1, 1.0)
    assert "base_model: my-base\n" in card and str(tmp_path) not in card
    assert "for 1 optimisation step (1 epoch) on" in card
    card = _card(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0", 6, 0.75)
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0\n" in card
    assert "for 6 optimisation steps (0.75 epochs) on" in card
    assert "(2 epochs)" in _card(tmp_path, "owner/name", 8, 2.0)


# ------------------------------------------------------------------------------------------------ make-dataset
def test_make_dataset_rerun_with_a_smaller_n_leaves_no_stale_files(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli_main(["make-dataset", str(out), "--n", "5", "--size", "16"]) == 0
    assert cli_main(["make-dataset", str(out), "--n", "2", "--size", "16"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    listed = {r["file_name"] for r in rows} | {r["conditioning_image_file_name"] for r in rows}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert len(rows) == 2 and on_disk == listed


def test_a_hub_dataset_without_network_is_one_request_and_one_line(monkeypatch):
    import datasets
    from huggingface_hub import HfApi, constants

    from controlnext.training.data import open_source

    def no_network(self, repo_id, **kw):
        raise RuntimeError("[Errno -2] Name or service not known")  # what the HTTP client raises, not an OSError

    def never(*a, **k):
        raise AssertionError("datasets.load_dataset (a minute of retries) was called")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(ValueError, match=r"^Dataset 'owner/data' is not a local path .*the hub cannot be reached"):
        open_source("owner/data")
