"""Settings in every PNG `controlnext generate` writes, and `generate --from-png` reading them back."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from controlnext.cli import main


@pytest.fixture()
def shapes_condition(tmp_path):
    from controlnext.shapes.world import condition_image, render_sample

    path = tmp_path / "edges.png"
    PIL.Image.fromarray(condition_image(render_sample(7, 0), "edges")).save(path)
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def test_generate_writes_its_settings_and_from_png_reproduces_the_image(tmp_path, shapes_condition):
    from controlnext.web.generation import read_settings

    out = tmp_path / "a.png"
    argv = ["generate", "--model", "demo", "--control-image", str(shapes_condition), "--prompt", "a red circle",
            "--steps", "3", "--seed", "7", "--control-scale", "0.8", "--guidance", "4", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    s = read_settings(out)  # the web app's reader
    assert (s["prompt"], s["seed"], s["steps"], s["guidance"], s["control_scale"]) == ("a red circle", 7, 3, 4.0, 0.8)
    assert s["base"] == "demo" and s["controlnext"].endswith("controlnext.safetensors")
    assert s["control_images"] == [str(shapes_condition.resolve())]
    assert "Seed: 7" in PIL.Image.open(out).text["parameters"]
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "b.png")]) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "b.png"), _pixels(out))
    # a flag given on the command line wins over the stored value
    assert main(["generate", "--from-png", str(out), "--seed", "8", "-o", str(tmp_path / "c.png")]) == 0
    assert read_settings(tmp_path / "c.png")["seed"] == 8
    assert not np.array_equal(_pixels(tmp_path / "c.png"), _pixels(out))
    assert main([*argv[:-1], str(tmp_path / "d.png"), "--seed", "8"]) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "c.png"), _pixels(tmp_path / "d.png"))


def test_from_png_reads_a_web_app_png(tmp_path, shapes_condition, monkeypatch):
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline
    from controlnext.shapes.demo import demo_assets
    from controlnext.web.generation import GenerationSettings, save_png

    root = demo_assets()
    settings = GenerationSettings(prompt="a blue star", steps=2, guidance=3.0, control_scale=0.6, seed=11,
                                  width=64, height=64, base=str(root / "base"),
                                  controlnext=str(root / "mask" / "controlnext.safetensors"), preprocessor="canny",
                                  preprocessor_options={"low": 10, "high": 20, "per_channel": False})  # fmt: skip
    save_png(PIL.Image.new("RGB", (64, 64)), tmp_path / "web.png", settings)
    calls, call = [], StableDiffusionControlNeXtPipeline.__call__

    def record(self, prompt, **kwargs):
        calls.append(dict(kwargs, prompt=prompt))
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(StableDiffusionControlNeXtPipeline, "__call__", record)
    argv = ["generate", "--from-png", str(tmp_path / "web.png"), "--control-image", str(shapes_condition)]
    assert main([*argv, "-o", str(tmp_path / "out.png")]) == 0
    (c,) = calls
    assert (c["prompt"], c["num_inference_steps"], c["guidance_scale"]) == ("a blue star", 2, 3.0)
    assert c["controlnext_conditioning_scale"] == 0.6 and c["generator"].initial_seed() == 11
    # the web app's preprocessor and its options made the condition from the image given
    import cv2
    import torch

    edges = cv2.Canny(np.asarray(PIL.Image.open(shapes_condition).convert("RGB")), 10.0, 20.0)
    expected = torch.from_numpy(np.repeat(edges[None], 3, 0)).float()[None] / 255
    torch.testing.assert_close(c["control_image"], expected)
    from controlnext.web.generation import read_settings

    assert read_settings(tmp_path / "out.png")["preprocessor_options"]["low"] == 10  # and the result records them


def test_from_png_errors_are_one_line(tmp_path, capsys):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "carries no controlnext settings" in line
    assert main(["generate", "--from-png", str(tmp_path / "none.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_from_png_finds_the_web_apps_condition_beside_its_result(tmp_path, shapes_condition, monkeypatch):
    import hashlib
    import shutil

    from controlnext.pipelines import StableDiffusionControlNeXtPipeline
    from controlnext.shapes.demo import demo_assets
    from controlnext.web.generation import GenerationSettings, save_png

    root, day = demo_assets(), tmp_path / "outputs" / "2026-12-01"
    day.mkdir(parents=True)
    shutil.copy(shapes_condition, day / "00003-condition.png")
    settings = GenerationSettings(prompt="a red circle", steps=2, seed=3, width=64, height=64, base=str(root / "base"),
                                  controlnext=str(root / "edges" / "controlnext.safetensors"), preprocessor="canny")
    sha = hashlib.sha256((day / "00003-condition.png").read_bytes()).hexdigest()
    save_png(PIL.Image.new("RGB", (64, 64)), day / "00003-0.png", settings,
             {"condition_file": "00003-condition.png", "condition_sha256": sha})  # fmt: skip
    seen, call = [], StableDiffusionControlNeXtPipeline.__call__
    monkeypatch.setattr(StableDiffusionControlNeXtPipeline, "__call__",
                        lambda self, *a, **kw: seen.append(kw["control_image"]) or call(self, *a, **kw))  # fmt: skip
    assert main(["generate", "--from-png", str(day / "00003-0.png"), "-o", str(tmp_path / "again.png")]) == 0
    from controlnext.conditioning import load_condition

    # the saved condition as it is: the recorded canny was applied when the app made it
    np.testing.assert_array_equal(seen[0].numpy(), load_condition(str(shapes_condition)).numpy())
