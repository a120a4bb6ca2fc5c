"""The model zoo: `controlnext models`, `controlnext download` and zoo names in `generate`, all offline.

The hub is never contacted: huggingface_hub runs in offline mode on a cache folder the test fills itself (the
layout hf_hub_download reads: ``models--OWNER--NAME/refs/main`` and ``snapshots/<commit>/<path>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from controlnext.cli import main
from controlnext.families import get_family
from controlnext.loading import load_controlnext_file, save_controlnext_file
from controlnext.models.controlnext import ControlNeXtModel
from controlnext.models.variants import VARIANTS
from controlnext.testing.models import tiny_controlnext
from controlnext.zoo import ZOO

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in offline mode; ``put(repo, path)`` returns where a cached file must be written."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo: str, filename: str) -> Path:
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        path = folder / "snapshots" / COMMIT / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    return put


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.variant])
def test_each_entry_names_a_variant_its_family_loads_from_a_file_of_that_layout(tmp_path, name):
    entry = ZOO[name]
    family = get_family(entry.family)
    assert entry.variant in VARIANTS and entry.variant in family.variants
    # A file with the variant's keys and shapes and no metadata, as the releases ship them, in the entry's format:
    # what the loader detects from it for the entry's base family must be the entry's variant.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ControlNeXtModel.from_variant(entry.variant).state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    path = tmp_path / Path(entry.module).name
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    assert load_controlnext_file(path, family=entry.family).config.variant == entry.variant
    assert entry.unet_mode in ("values", "deltas") and entry.unet and entry.base_model


def test_release_facts_the_table_records():
    # From the release READMEs and scripts (see controlnext/zoo.py): the SDXL UNet files are weight increments.
    assert ZOO["sdxl-depth"].repo == "Eugeoter/controlnext-sdxl-vidit-depth"
    assert ZOO["sdxl-anime-canny"].files == ("controlnet.safetensors", "unet.safetensors")
    assert {ZOO[n].unet_mode for n in ("sdxl-depth", "sdxl-anime-canny")} == {"deltas"}
    # the authors' recommended control scales (SDXL training README, issue #36): canny 0.35, depth 1.0
    assert (ZOO["sdxl-anime-canny"].scale, ZOO["sdxl-depth"].scale) == (0.35, 1.0)
    assert ZOO["svd-v1"].files == ("ControlNeXt-SVD/finetune/controlnet.bin", "ControlNeXt-SVD/finetune/unet_fp16.bin")
    assert ZOO["svd-v2"].files == ("ControlNeXt-SVD/v2/controlnet.bin", "ControlNeXt-SVD/v2/unet.bin")
    assert ZOO["dwpose"].files == ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")


def test_models_lists_every_entry_as_a_table_and_as_json(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "variant"]
    assert {line.split()[0] for line in lines[1 : 1 + len(ZOO)]} == set(ZOO)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(ZOO)
    depth = next(r for r in rows if r["name"] == "sdxl-depth")
    assert depth["files"] == ["controlnet.safetensors", "unet.safetensors"] and depth["scale"] == 1.0


def test_download_offline_without_the_files_is_one_line(hub_cache, capsys):
    assert main(["download", "sdxl-depth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "HF_HUB_OFFLINE" in err[0] and "controlnext download sdxl-depth" in err[0] and "Traceback" not in err[0]
    assert main(["download", "sdxl-nope"]) == 2
    assert "unknown model 'sdxl-nope'" in capsys.readouterr().err


def test_download_finds_cached_files(hub_cache, capsys):
    entry = ZOO["dwpose"]
    expected = []
    for f in entry.files:
        path = hub_cache(entry.repo, f)
        path.write_bytes(b"onnx")
        expected.append(str(path))
    assert main(["download", "dwpose"]) == 0
    assert capsys.readouterr().out.split() == expected


@pytest.fixture()
def condition(tmp_path):
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[16:48, 16:48] = 255
    path = tmp_path / "cond.png"
    PIL.Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def cached_sd15_mask(hub_cache, tmp_path):
    """The sd15-mask entry's two files in the cache: a tiny module and a one-tensor UNet subset (values)."""
    entry = ZOO["sd15-mask"]
    module = save_controlnext_file(tiny_controlnext("sd15-training", seed=3), hub_cache(entry.repo, entry.module))
    unet = hub_cache(entry.repo, entry.unet)
    return module, unet


def _record_calls(monkeypatch):
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline

    calls, call = [], StableDiffusionControlNeXtPipeline.__call__

    def record(self, *args, **kwargs):
        calls.append(dict(kwargs, unet=self.unet.state_dict()["conv_out.bias"].clone()))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionControlNeXtPipeline, "__call__", record)
    return calls


def test_generate_takes_a_zoo_name_with_its_files_and_settings(
    tiny_sd15_dir, cached_sd15_mask, condition, tmp_path, monkeypatch
):
    module, unet = cached_sd15_mask
    save_file({"conv_out.bias": torch.full((4,), 0.25)}, str(unet))  # values, as the SD1.5 release's unet files
    calls = _record_calls(monkeypatch)
    argv = ["generate", "--model", str(tiny_sd15_dir), "--control-image", str(condition), "--prompt", "x"]
    assert main([*argv, "--controlnext", "sd15-mask", "-o", str(tmp_path / "zoo.png")]) == 0
    explicit = ["--controlnext", str(module), "--unet-weights", str(unet), "--unet-weights-mode", "values"]
    assert main([*argv, *explicit, "--steps", "20", "--guidance", "7.5", "-o", str(tmp_path / "ref.png")]) == 0
    zoo, ref = calls
    assert (zoo["num_inference_steps"], zoo["guidance_scale"], zoo["controlnext_conditioning_scale"]) == (20, 7.5, 1.0)
    assert torch.equal(zoo["unet"], torch.full((4,), 0.25))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "zoo.png")),
                                  np.asarray(PIL.Image.open(tmp_path / "ref.png")))  # fmt: skip
    # flags given on the command line win over the entry's recommendations
    assert main([*argv, "--controlnext", "sd15-mask", "--steps", "2", "--control-scale", "0.5", "-o",
                 str(tmp_path / "o.png")]) == 0  # fmt: skip
    assert (calls[-1]["num_inference_steps"], calls[-1]["controlnext_conditioning_scale"]) == (2, 0.5)


def test_generate_with_a_zoo_name_not_downloaded_while_offline_is_one_line(hub_cache, condition, capsys):
    argv = ["generate", "--controlnext", "sdxl-depth", "--control-image", str(condition), "--prompt", "x"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not in the hub cache" in line and "controlnext download sdxl-depth" in line


def test_a_cached_release_unet_file_is_read_in_the_zoos_mode(hub_cache, tmp_path):
    from controlnext.loading import unet_weights_mode

    # The SDXL releases name their deltas unet.safetensors: the file name alone would say "values".
    sdxl = hub_cache(ZOO["sdxl-depth"].repo, "unet.safetensors")
    sd15 = hub_cache(ZOO["sd15-depth"].repo, ZOO["sd15-depth"].unet)
    assert (unet_weights_mode(sdxl, {}), unet_weights_mode(sd15, {})) == ("deltas", "values")
    assert unet_weights_mode(tmp_path / "unet.safetensors", {}) == "values"
    assert unet_weights_mode(sdxl, {"controlnext_unet_weights": "values"}) == "values"  # metadata first


def test_eval_takes_a_zoo_name(hub_cache, capsys):
    import shutil

    from safetensors import safe_open

    from controlnext.shapes.demo import demo_assets

    root, entry = demo_assets(), ZOO["sd15-mask"]
    module = hub_cache(entry.repo, entry.module)
    shutil.copy(root / "mask" / "controlnext.safetensors", module)
    with safe_open(str(root / "base" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        bias = f.get_tensor("conv_out.bias")
    save_file({"conv_out.bias": bias}, str(hub_cache(entry.repo, entry.unet)))  # values: the base's own
    argv = ["eval", "--model", "demo", "--controlnext", "sd15-mask", "--condition", "mask", "--n", "1", "--steps", "1"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["module"] == str(module)


def test_a_zoo_name_whose_base_model_is_not_cached_offline_is_one_line(hub_cache, condition, capsys):
    entry = ZOO["sdxl-depth"]
    for f in entry.files:  # the module's files are there; the base model they default to is not
        hub_cache(entry.repo, f).write_bytes(b"not read: the base model is looked up first")
    argv = ["generate", "--controlnext", "sdxl-depth", "--control-image", str(condition), "--prompt", "x"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the base model stabilityai/stable-diffusion-xl-base-1.0 is not in the hub cache" in line
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in line


def test_python_m_controlnext_cli_errors_are_one_line(condition):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "controlnext.cli", "generate", "--model", "owner/model", "--control-image",
           str(condition), "--prompt", "x"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "controlnext generate: error: --controlnext is required (a control module folder, file, hub id or zoo name) "
        "unless --model is demo"
    ]


def test_generate_with_a_zoo_sdxl_module_and_another_applies_its_deltas_and_scales(
    tiny_sdxl_dir, hub_cache, condition, tmp_path, monkeypatch
):
    from controlnext.pipelines import StableDiffusionXLControlNeXtPipeline

    entry = ZOO["sdxl-anime-canny"]
    save_controlnext_file(tiny_controlnext("sdxl", seed=4), hub_cache(entry.repo, entry.module))
    save_file({"conv_out.bias": torch.full((4,), 0.5)}, str(hub_cache(entry.repo, entry.unet)))  # deltas
    plain = save_controlnext_file(tiny_controlnext("sdxl", seed=5), tmp_path / "plain.safetensors")
    calls, call = [], StableDiffusionXLControlNeXtPipeline.__call__

    def record(self, *args, **kwargs):
        calls.append(dict(kwargs, bias=self.unet.state_dict()["conv_out.bias"].clone()))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLControlNeXtPipeline, "__call__", record)
    argv = ["generate", "--model", str(tiny_sdxl_dir), "--controlnext", "sdxl-anime-canny", "--controlnext",
            str(plain), "--control-image", str(condition), "--prompt", "x", "-o", str(tmp_path / "o.png")]  # fmt: skip
    assert main(argv) == 0
    (c,) = calls
    assert c["controlnext_conditioning_scale"] == [0.35, 1.0]  # the entry's recommendation, 1 for the other module
    assert (c["num_inference_steps"], c["guidance_scale"]) == (20, 5.0)
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        base = f.get_tensor("conv_out.bias")
    torch.testing.assert_close(c["bias"], base + 0.5)  # added to the base, as the release's weight increments


def test_web_takes_a_zoo_name(tiny_sd15_dir, cached_sd15_mask, tmp_path):
    pytest.importorskip("gradio")
    from controlnext.cli import build_parser
    from controlnext.commands.web import build_config

    module, unet = cached_sd15_mask
    save_file({"conv_out.bias": torch.zeros(4)}, str(unet))
    argv = ["web", "--model", str(tiny_sd15_dir), "--controlnext", "sd15-mask", "--no-demo", "--output-dir",
            str(tmp_path)]  # fmt: skip
    (spec,) = build_config(build_parser().parse_args(argv)).models
    assert (spec.controlnext, spec.unet_weights) == (str(module), str(unet))
    assert (spec.steps, spec.guidance) == (20, 7.5)


def test_video_takes_the_svd_names_and_dwpose(hub_cache, condition, tmp_path):
    from controlnext.cli import build_parser
    from controlnext.commands.video import _resolve_zoo

    for name in ("svd-v2", "dwpose"):
        for f in ZOO[name].files:
            hub_cache(ZOO[name].repo, f).write_bytes(b"cached")
    base = ["video", "--controlnext", "svd-v2", "--reference", str(condition), "--pose-video", str(tmp_path), "-o",
            str(tmp_path / "v.mp4"), "--dwpose-dir", "dwpose"]  # fmt: skip
    args = build_parser().parse_args(base)
    _resolve_zoo(args)
    assert Path(args.controlnext).parts[-3:] == ("ControlNeXt-SVD", "v2", "controlnet.bin")
    assert Path(args.unet_weights).name == "unet.bin" and args.controlnext_variant == "svd-v2"
    assert args.model == "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
    assert (args.steps, args.min_guidance, args.max_guidance) == (25, 3.0, 3.0)
    assert {p.name for p in Path(args.dwpose_dir).iterdir()} == {"yolox_l.onnx", "dw-ll_ucoco_384.onnx"}
    args = build_parser().parse_args([*base, "--guidance", "2.5", "--steps", "4"])
    _resolve_zoo(args)
    assert (args.steps, args.min_guidance, args.max_guidance) == (4, 2.5, 2.5)


def test_train_fine_tunes_a_zoo_module_from_the_cache(hub_cache, tmp_path, capsys):
    import shutil

    from controlnext.shapes.demo import demo_assets

    entry = ZOO["sd15-mask"]
    module = hub_cache(entry.repo, entry.module)
    shutil.copy(demo_assets() / "mask" / "controlnext.safetensors", module)  # a published-layout module to start from
    assert main(["make-dataset", str(tmp_path / "data"), "--n", "2", "--condition", "mask"]) == 0
    argv = ["train", "--model", "demo", "--dataset", str(tmp_path / "data"), "--resolution", "64", "--train-unet",
            "none", "--max-train-steps", "1", "--learning-rate", "1e-9", "--report-to", "none", "--cpu-threads", "1",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main([*argv, "--controlnext", "sd15-mask"]) == 0
    start, tuned = load_controlnext_file(module), load_controlnext_file(tmp_path / "run" / "controlnext.safetensors")
    assert tuned.config.variant == start.config.variant
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):  # one 1e-9 step from the file
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    capsys.readouterr()
    # not downloaded while offline: the zoo's one line, before anything is loaded
    assert main([*argv, "--controlnext", "sdxl-depth", "--output-dir", str(tmp_path / "run2")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not in the hub cache" in line and "controlnext download sdxl-depth" in line
    assert main([*argv, "--controlnext", "svd-v2", "--output-dir", str(tmp_path / "run3")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "svd-v2 is not an image control module" in line
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


def test_train_video_takes_a_zoo_name(hub_cache, tmp_path, capsys, monkeypatch):
    """train-video --controlnext svd-v2 resolves through the hub cache (offline: the zoo's one line, before anything
    is loaded); an image module is refused in one line."""
    import controlnext.training.video.__main__ as video_main
    from controlnext.cli import build_parser
    from controlnext.commands import train_video

    argv = ["train-video", "--model", str(tmp_path / "svd"), "--dataset", str(tmp_path / "clips")]
    assert main([*argv, "--controlnext", "svd-v2", "--output-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not in the hub cache" in line and "controlnext download svd-v2" in line
    assert main([*argv, "--controlnext", "sd15-mask", "--output-dir", str(tmp_path / "run2")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "sd15-mask is not a video control module" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
    # cached: the name becomes the module file that training starts from
    entry = ZOO["svd-v2"]
    module = hub_cache(entry.repo, entry.module)
    module.write_bytes(b"stands for the published file")
    seen = {}
    monkeypatch.setattr(video_main, "run", lambda args: seen.setdefault("controlnext", args.controlnext) and 0)
    assert train_video.run(build_parser().parse_args([*argv, "--controlnext", "svd-v2"])) == 0
    assert seen["controlnext"] == str(module)
