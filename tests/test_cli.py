"""The `controlnext` CLI end to end on a tiny model folder written by the test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from controlnext.cli import main
from controlnext.loading import save_controlnext_file
from controlnext.testing.models import tiny_controlnext


def test_help_lists_commands_without_loading_torch():
    # Building the parser must stay cheap: `controlnext --help` answered in ~5 s when it imported torch/diffusers.
    code = (
        "import sys\n"
        "from controlnext.cli import build_parser\n"
        "print(' '.join(build_parser()._subparsers._group_actions[0].choices))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    commands, heavy = out.stdout.strip().splitlines()
    assert {"generate", "train", "train-video", "bench", "demo", "eval", "web"} <= set(commands.split())
    assert heavy == "[]"
    out = subprocess.run([sys.executable, "-m", "controlnext.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "generate" in out.stdout


@pytest.fixture()
def condition(tmp_path):
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[16:48, 16:48] = 255
    path = tmp_path / "cond.png"
    PIL.Image.fromarray(arr).save(path)
    return path


def test_generate_end_to_end(tiny_sd15_dir, tmp_path, condition):
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd15_dir),
            "--controlnext",
            str(module),
            "--control-image",
            str(condition),
            "--prompt",
            "a red square",
            "--steps",
            "2",
            "--seed",
            "1",
            "--scheduler",
            "euler",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    img = PIL.Image.open(out)
    assert img.size == (64, 64)


def test_generate_sdxl_folder_module(tiny_sdxl_dir, tmp_path, condition):
    tiny_controlnext("sdxl").save_pretrained(tmp_path / "cn")
    out = tmp_path / "xl.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sdxl_dir),
            "--controlnext",
            str(tmp_path / "cn"),
            "--control-image",
            str(condition),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--num-images",
            "2",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and (tmp_path / "xl_0.png").is_file() and (tmp_path / "xl_1.png").is_file()


def test_generate_bad_inputs_give_one_line_errors(tiny_sd15_dir, tmp_path, condition, capsys):
    module = save_controlnext_file(tiny_controlnext("sdxl", out_channels=320), tmp_path / "xl.safetensors")
    base = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "--steps", "1"]
    assert main([*base, "--controlnext", str(module), "--control-image", str(condition)]) == 2
    assert "for sdxl UNets" in capsys.readouterr().err
    assert main([*base, "--controlnext", str(module), "--control-image", str(tmp_path / "none.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--controlnext", str(tmp_path / "nope.safetensors"), "--control-image", str(condition)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert main([*base, "--controlnext", str(module), "--control-image", str(condition), "--height", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
