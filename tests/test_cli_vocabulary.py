"""One vocabulary across the commands (old spellings as hidden aliases), docs/cli.md, canny defaults, web demo names."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest

from controlnext.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _commands(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _parse(argv, capsys):
    args = build_parser().parse_args(argv)
    return args, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "old,new,deprecated",
    [
        (["eval", "--base", "demo", "--module", "demo:mask", "--module", "x", "--scale", "0.5"],
         ["eval", "--model", "demo", "--controlnext", "demo:mask", "--controlnext", "x", "--control-scale", "0.5"],
         ["--base", "--module", "--module", "--scale"]),
        (["web", "--lora-weight", "0.7", "--outputs", "out", "--pose-models", "dw"],
         ["web", "--lora-scale", "0.7", "--output-dir", "out", "--dwpose-dir", "dw"],
         ["--lora-weight", "--outputs", "--pose-models"]),
    ],
)  # fmt: skip
def test_old_spellings_are_hidden_aliases_with_one_line_each(capsys, old, new, deprecated):
    old_args, old_err = _parse(old, capsys)
    new_args, new_err = _parse(new, capsys)
    plain = {k: v for k, v in vars(old_args).items() if not k.startswith("spelling:")}  # the flags as typed
    assert plain == vars(new_args) and new_err == []
    replaced = dict(zip(old[1::2], new[1::2]))
    assert old_err == [f"note: {flag} is deprecated; use {replaced[flag]}" for flag in deprecated]
    command = _commands(build_parser())[old[0]]
    assert not set(deprecated) & set(command.format_help().split())  # hidden from --help


def test_generate_help_shows_the_defaults():
    import re

    text = _commands(build_parser())["generate"].format_help()
    for flag, default in (("--steps", "30"), ("--guidance", "7.5"), ("--control-scale", "1.0"), ("--seed", "0"),
                          ("--num-images", "1"), ("--fit", "crop"), ("--strength", "0.8")):  # fmt: skip
        # the option's entry: from its line in the options list to the next option
        entry = re.search(rf"^  {flag} \S+(.*?)(?=^  -)", text, re.S | re.M).group(1)
        assert f"(default: {default})" in " ".join(entry.split()), flag


def test_docs_cli_lists_every_command_and_flag():
    text = DOCS.read_text()
    for name, command in _commands(build_parser()).items():
        assert f"### `controlnext {name}`" in text, name
        parsers = [command, *(p for a in command._actions if isinstance(a, argparse._SubParsersAction)
                              for p in a.choices.values())]  # fmt: skip
        for parser in parsers:
            for action in parser._actions:
                if action.help == argparse.SUPPRESS:
                    continue
                hidden = set(getattr(action, "deprecated", ()))
                for flag in set(action.option_strings) - hidden - {"-h", "--help"}:
                    assert f"`{flag}" in text or f", {flag}" in text, \
                        f"{name} {flag} is not in docs/cli.md: run python scripts/cli_reference.py --write"


def test_preprocess_canny_defaults_are_the_demo_models_50_150_per_channel(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # colour blocks with soft gradients: thresholds and channel handling both change the edges
    img = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    PIL.Image.fromarray(img).save(tmp_path / "photo.png")
    assert main(["preprocess", "canny", str(tmp_path / "photo.png"), "-o", str(tmp_path / "e.png")]) == 0
    got = np.asarray(PIL.Image.open(tmp_path / "e.png"))[..., 0]
    expected = np.zeros(img.shape[:2], np.uint8)
    for c in range(3):  # OpenCV on each channel at 50/150, joined: what the demo model was trained on
        expected |= cv2.Canny(np.ascontiguousarray(img[..., c]), 50.0, 150.0)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, cv2.Canny(img, 100.0, 200.0))
    from controlnext.web.generation import read_settings

    recorded = read_settings(tmp_path / "e.png")  # how the condition was made, in the PNG
    assert (recorded["preprocessor"], recorded["preprocessor_options"]) == (
        "canny", {"low": 50, "high": 150, "blur": 0, "per_channel": True})  # fmt: skip
    # --no-per-channel and explicit thresholds still give the single-pass detector
    argv = ["preprocess", "canny", str(tmp_path / "photo.png"), "-o", str(tmp_path / "f.png"), "--no-per-channel"]
    assert main([*argv, "--low", "100", "--high", "200"]) == 0
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "f.png"))[..., 0], cv2.Canny(img, 100.0, 200.0))


def test_readme_canny_example_uses_the_defaults():
    readme = (DOCS.parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("controlnext preprocess canny"))
    assert "--low" not in line and "--high" not in line


@pytest.mark.parametrize("name,kind", [("demo", "edges"), ("demo:edges", "edges"), ("demo:mask", "mask")])
def test_web_takes_the_demo_model_by_name(tmp_path, name, kind):
    pytest.importorskip("gradio")
    from controlnext.commands.web import build_config
    from controlnext.shapes.demo import demo_assets

    root = demo_assets()
    parse = build_parser().parse_args
    cfg = build_config(parse(["web", "--model", name, "--no-demo", "--output-dir", str(tmp_path)]))
    (spec,) = cfg.models
    assert (spec.base, spec.controlnext) == (str(root / "base"), str(root / kind / "controlnext.safetensors"))
    assert spec.unet_weights == str(root / kind / "unet_weight_increasements.safetensors")
    # without --no-demo the demo presets are listed once
    cfg = build_config(parse(["web", "--model", name, "--output-dir", str(tmp_path)]))
    assert len(cfg.models) == len({m.label for m in cfg.models}) == 2
    # the demo base with the other demo module
    other = "demo:mask" if kind == "edges" else "demo:edges"
    cfg = build_config(parse(["web", "--model", name, "--controlnext", other, "--no-demo", "--output-dir", "o"]))
    assert cfg.models[0].controlnext == str(root / other.partition(":")[2] / "controlnext.safetensors")
