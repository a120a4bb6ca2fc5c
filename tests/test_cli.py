"""The `controlnext` CLI end to end on a tiny model folder written by the test."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

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


def _generate_args(model, module, condition, out, *flags) -> list[str]:
    return [
        "generate", "--model", str(model), "--controlnext", str(module), "--control-image", str(condition),
        "--prompt", "x", "--steps", "1", "-o", str(out), *flags,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--control-scale", "nan"], "--control-scale must be a finite number in [0.0, 10.0]"),
        (["--control-scale", "inf"], "--control-scale must be a finite number"),
        (["--control-scale", "1e30"], "--control-scale must be a finite number"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--lora-scale", "nan"], "--lora-scale must be a finite number"),
        (["--height", "100000"], "--height must be a positive multiple of 8 up to 4096"),
        (["--num-images", "10000"], "--num-images must be between 1 and 64"),
    ],
)
def test_generate_refuses_out_of_range_numbers(tiny_sd15_dir, tmp_path, condition, capsys, flags, message):
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    out = tmp_path / "out.png"
    assert main(_generate_args(tiny_sd15_dir, module, condition, out, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header says width x height (with the data of a 1x1 image): only its header can be read."""
    small = io.BytesIO()
    PIL.Image.new("L", (1, 1)).save(small, "PNG")
    data = bytearray(small.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: 8-byte signature, length, type, then width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_generate_unreadable_and_oversized_conditions_are_one_line_errors(tiny_sd15_dir, tmp_path, condition, capsys):
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(condition.read_bytes()[:-40])
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    _png_claiming(tmp_path / "big.png", 9000, 8000)  # under PIL's bomb limit, over ours
    wide = tmp_path / "wide.png"
    PIL.Image.new("RGB", (3000, 64)).save(wide)  # readable, but the output would follow it to 3000 px
    text = tmp_path / "module.pt"
    text.write_text("hello world")
    cases = [
        (truncated, module, "damaged or truncated"),
        (tmp_path / "bomb.png", module, "too large to decode"),
        (tmp_path / "big.png", module, "9000x8000 pixels; conditions are limited to 67 MP"),
        (wide, module, "only up to 2048 px per side. Pass height and width"),
        (condition, text, "not a readable torch file"),
    ]
    out = tmp_path / "out.png"
    for cond, mod, message in cases:
        assert main(_generate_args(tiny_sd15_dir, mod, cond, out)) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # the wide condition works once the output size is given
    assert main(_generate_args(tiny_sd15_dir, module, wide, out, "--width", "64", "--height", "8")) == 0
    assert PIL.Image.open(tmp_path / "out.png").size == (64, 8)


@pytest.mark.parametrize("size,expected", [((60, 60), (64, 64)), ((7, 5), (64, 64)), ((1, 1), (64, 64))])
def test_generate_on_the_demo_model_fits_any_condition_size_to_its_native_size(tmp_path, size, expected):
    # The demo model's VAE factor is 4 and its native size 64 px; the stock pipelines take only multiples of 8.
    from controlnext.shapes.demo import demo_assets

    root = demo_assets()
    cond = tmp_path / "cond.png"
    PIL.Image.new("RGB", size, (255, 255, 255)).save(cond)
    out = tmp_path / "out.png"
    assert main(_generate_args(root / "base", root / "edges" / "controlnext.safetensors", cond, out)) == 0
    assert PIL.Image.open(out).size == expected


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10000000000 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB"),
        RuntimeError("an unrelated failure"),
    ],
)
def test_generate_out_of_memory_is_one_line(tiny_sd15_dir, tmp_path, condition, capsys, monkeypatch, error):
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(StableDiffusionControlNeXtPipeline, "__call__", fail)
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    argv = _generate_args(tiny_sd15_dir, module, condition, tmp_path / "out.png")
    if "unrelated" in str(error):  # only memory errors are turned into a message
        with pytest.raises(RuntimeError, match="unrelated"):
            main(argv)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "out of memory on cpu: lower --num-images or --height/--width" in err and "Traceback" not in err


def _demo_subprocess(tmp_path, *flags):
    cmd = [sys.executable, "-m", "controlnext.cli", *flags, "demo", "--n", "1", "--steps", "2", "-o", str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_demo_prints_no_library_warnings_and_verbose_brings_them_back(tmp_path):
    out = _demo_subprocess(tmp_path)
    assert out.returncode == 0, out.stderr
    # torchvision advice, diffusers' FutureWarnings and float32 note, loading bars: none of it reaches the user
    assert out.stderr == "", out.stderr
    assert "control fidelity" in out.stdout
    loud = _demo_subprocess(tmp_path, "-v")
    assert loud.returncode == 0, loud.stderr
    assert "Loading pipeline components" in loud.stderr


def test_quiet_cli_restores_the_libraries_logging_for_in_process_callers(tmp_path):
    import diffusers
    import transformers

    before = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    assert main(["demo", "--n", "1", "--steps", "1", "-o", str(tmp_path)]) == 0
    assert (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()) == before
    assert diffusers.utils.logging.is_progress_bar_enabled()


@pytest.fixture()
def shapes_condition(tmp_path):
    # a 64 px edge map of the demo world (its native size), so no fitting is involved
    from controlnext.shapes.world import condition_image, render_sample

    path = tmp_path / "condition-edges.png"
    PIL.Image.fromarray(condition_image(render_sample(7, 0), "edges")).save(path)
    return path


def _generate_demo(tmp_path, name, model, module, condition) -> np.ndarray:
    argv = ["generate", "--model", str(model), "--control-image", str(condition), "--prompt", "a red circle"]
    argv += ["--steps", "2", "-o", str(tmp_path / f"{name}.png")] + (["--controlnext", str(module)] if module else [])
    if module and Path(module).is_file():  # files: the UNet deltas and the demo's guidance are passed explicitly
        from controlnext.shapes.demo import DEMO_GUIDANCE

        argv += ["--unet-weights", str(Path(module).parent / "unet_weight_increasements.safetensors")]
        argv += ["--guidance", str(DEMO_GUIDANCE)]
    assert main(argv) == 0
    return np.asarray(PIL.Image.open(tmp_path / f"{name}.png"))


def test_generate_takes_the_demo_model_by_name(tmp_path, shapes_condition):
    from controlnext.shapes.demo import demo_assets

    base, edges, mask = (demo_assets() / part for part in ("base", "edges", "mask"))
    edges = _generate_demo(tmp_path, "edges", base, edges / "controlnext.safetensors", shapes_condition)
    mask = _generate_demo(tmp_path, "mask", base, mask / "controlnext.safetensors", shapes_condition)
    assert not np.array_equal(edges, mask)
    np.testing.assert_array_equal(_generate_demo(tmp_path, "a", "demo", None, shapes_condition), edges)
    np.testing.assert_array_equal(_generate_demo(tmp_path, "b", "demo:edges", None, shapes_condition), edges)
    np.testing.assert_array_equal(_generate_demo(tmp_path, "c", "demo:mask", None, shapes_condition), mask)
    np.testing.assert_array_equal(_generate_demo(tmp_path, "d", "demo", "demo:mask", shapes_condition), mask)
    # The name brings the module's UNet deltas (the published recipe): the module alone makes another image.
    argv = ["generate", "--model", str(base), "--controlnext", str(demo_assets() / "edges" / "controlnext.safetensors")]
    argv += ["--control-image", str(shapes_condition), "--prompt", "a red circle", "--steps", "2"]
    assert main([*argv, "-o", str(tmp_path / "plain.png")]) == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(tmp_path / "plain.png")), edges)


def test_generate_without_a_module_names_the_option(tmp_path, condition, capsys):
    argv = ["generate", "--model", "owner/model", "--control-image", str(condition), "--prompt", "x"]
    assert main(argv) == 2
    assert "--controlnext is required" in capsys.readouterr().err


def test_eval_takes_the_demo_model_by_name(tmp_path, capsys):
    import json

    from controlnext.shapes.demo import demo_assets

    root = demo_assets()
    argv = ["eval", "--base", "demo", "--module", "demo:mask", "--condition", "mask", "--n", "1", "--steps", "1"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["base"] == str(root / "base")
    assert result["module"] == str(root / "mask" / "controlnext.safetensors")


def test_train_takes_the_demo_model_by_name(tmp_path, monkeypatch):
    import controlnext.training as training
    from controlnext.shapes.demo import demo_assets

    seen = []
    monkeypatch.setattr(training, "train", seen.append)
    (tmp_path / "data").mkdir()
    assert main(["train", "--model", "demo", "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path)]) == 0
    (cfg,) = seen
    assert cfg.pretrained_model == str(demo_assets() / "base")


@pytest.fixture()
def three_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # torch's "own" count in these tests, distinct from 1 and from what --threads asks
    yield
    torch.set_num_threads(previous)


def test_generate_threads_default_to_one_on_the_demo_model_and_torchs_otherwise(
    tiny_sd15_dir, tmp_path, condition, shapes_condition, monkeypatch, three_threads
):
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline

    seen, call = [], StableDiffusionControlNeXtPipeline.__call__

    def record(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionControlNeXtPipeline, "__call__", record)
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    out = tmp_path / "out.png"
    assert main(_generate_args(tiny_sd15_dir, module, condition, out)) == 0
    assert main(_generate_args(tiny_sd15_dir, module, condition, out, "--threads", "2")) == 0
    assert main(_generate_args("demo", "demo:edges", shapes_condition, out)) == 0
    assert main(_generate_args("demo", "demo:edges", shapes_condition, out, "--threads", "2")) == 0
    assert seen == [3, 2, 1, 2]
    assert torch.get_num_threads() == 3  # restored for an in-process caller


def test_generate_refuses_zero_threads(tiny_sd15_dir, tmp_path, condition, capsys):
    module = save_controlnext_file(tiny_controlnext("sd15-training"), tmp_path / "cn.safetensors")
    assert main(_generate_args(tiny_sd15_dir, module, condition, tmp_path / "o.png", "--threads", "0")) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_web_threads_default_to_one_for_the_demo_models_and_torchs_otherwise(
    tiny_sd15_dir, tmp_path, monkeypatch, three_threads
):
    pytest.importorskip("gradio")
    import controlnext.web.app as web_app

    seen = []
    monkeypatch.setattr(web_app, "launch", lambda config, block=True: seen.append(torch.get_num_threads()))
    web = ["web", "--outputs", str(tmp_path)]
    assert main(web) == 0
    assert main([*web, "--threads", "2"]) == 0
    assert main([*web, "--model", str(tiny_sd15_dir)]) == 0
    assert main([*web, "--model", str(tiny_sd15_dir), "--threads", "4"]) == 0
    assert seen == [1, 2, 3, 4]


def test_web_without_gradio_names_the_extra_in_one_line():
    code = (
        "import sys\n"
        "sys.modules['gradio'] = None  # as if it were not installed\n"
        "from controlnext.cli import main\n"
        "sys.exit(main(['web']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    expected = 'controlnext web: error: the web app needs gradio: pip install "controlnext[web]"'
    assert out.stderr.strip().splitlines() == [expected]


def _stderr_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def test_generate_fits_a_large_condition_to_the_demo_models_native_size(tmp_path, capsys):
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    big = PIL.Image.fromarray((rng.random((200, 256)) > 0.9).astype(np.uint8) * 255).convert("RGB")
    big.save(tmp_path / "big.png")
    references = {  # the condition fitted by PIL itself, at the native size: no fitting left to the CLI
        "crop": ImageOps.fit(big, (64, 64), method=PIL.Image.Resampling.LANCZOS),
        "pad": ImageOps.pad(big, (64, 64), method=PIL.Image.Resampling.LANCZOS, color=(0, 0, 0)),
        "stretch": big.resize((64, 64), PIL.Image.Resampling.LANCZOS),
    }
    images = {}

    def generate(condition, out, *flags):
        return main([*_generate_args("demo", "demo:edges", condition, out, *flags), "--prompt", "a red star"])

    for fit, reference in references.items():
        reference.save(tmp_path / f"{fit}-64.png")
        assert generate(tmp_path / f"{fit}-64.png", tmp_path / "ref.png") == 0
        assert _stderr_warnings(capsys.readouterr().err) == []
        flags = [] if fit == "crop" else ["--fit", fit]  # crop is the default, as in the web app
        assert generate(tmp_path / "big.png", tmp_path / "out.png", *flags) == 0
        (line,) = _stderr_warnings(capsys.readouterr().err)
        assert "256x200" in line and "64x64" in line and f"--fit {fit}" in line
        images[fit] = np.asarray(PIL.Image.open(tmp_path / "out.png"))
        assert images[fit].shape == (64, 64, 3)
        np.testing.assert_array_equal(images[fit], np.asarray(PIL.Image.open(tmp_path / "ref.png")))
    assert not np.array_equal(images["crop"], images["pad"])
    # --width/--height choose another size, without a warning
    assert generate(tmp_path / "big.png", tmp_path / "wide.png", "--width", "96", "--height", "48") == 0
    assert _stderr_warnings(capsys.readouterr().err) == []
    assert PIL.Image.open(tmp_path / "wide.png").size == (96, 48)


def test_generate_warns_once_about_words_the_demo_model_does_not_know(tmp_path, shapes_condition, capsys):
    from controlnext.shapes.world import VOCABULARY

    out = tmp_path / "out.png"
    known = "a red circle on a white background"
    assert set(known.split()) <= set(VOCABULARY)
    assert main([*_generate_args("demo", "demo:edges", shapes_condition, out), "--prompt", known]) == 0
    assert _stderr_warnings(capsys.readouterr().err) == []
    prompt = "a photo of a red circle, highly detailed"
    assert main([*_generate_args("demo", "demo:edges", shapes_condition, out), "--prompt", prompt]) == 0
    (line,) = _stderr_warnings(capsys.readouterr().err)
    assert "detailed, highly, of, photo" in line
