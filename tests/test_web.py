"""The web app's logic without a browser: validation, limits, model references, generation and PNG settings."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from controlnext.web.generation import GenerationSettings, generate, read_settings, resolve_seed, save_png  # noqa: E402
from controlnext.web.limits import Limits, UploadError, load_upload  # noqa: E402
from controlnext.web.models import (  # noqa: E402
    TINY,
    ModelCache,
    ModelSpec,
    default_model,
    load_model,
    validate_base_ref,
    validate_control_ref,
    validate_lora_ref,
)


def square_condition(size=64) -> Image.Image:
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4 : 3 * size // 4, size // 4] = 255
    img[size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(img)


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "change,message",
    [
        ({"steps": 0}, "Steps"),
        ({"steps": 151}, "Steps"),
        ({"guidance": -1}, "Guidance"),
        ({"control_scale": 9}, "Control scale"),
        ({"control_start": 0.6, "control_end": 0.5}, "Control start must be below"),
        ({"batch_size": 9}, "Batch size"),
        ({"width": 100}, "multiple of 8"),
        ({"height": 4096}, "Height must be between"),
        ({"seed": -3}, "Seed"),
        ({"guidance": float("nan")}, "(?i)guidance"),
        ({"prompt": "x" * 5000}, "characters"),
    ],
)
def test_settings_validation_messages(change, message):
    s = GenerationSettings(**{**dict(width=64, height=64), **change})
    with pytest.raises(ValueError, match=message):
        s.validate(Limits())


def test_resolve_seed():
    assert resolve_seed(12, False) == 12
    assert resolve_seed(12.0, False) == 12
    seeds = {resolve_seed(12, True) for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="whole number"):
        resolve_seed(1.5, False)


def test_png_metadata_roundtrip(tmp_path):
    s = GenerationSettings(
        prompt="a red star", negative_prompt="blurry", seed=42, preprocessor="canny",
        preprocessor_options={"low": 50, "high": 150}, base="/models/sd", controlnext="cn.safetensors",
    )  # fmt: skip
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "r.png", s, {"condition_file": "00001-condition.png"})
    data = read_settings(path)
    assert GenerationSettings.from_json(data) == s and data["condition_file"] == "00001-condition.png"
    text = Image.open(path).text["parameters"]
    assert text.startswith("a red star\nNegative prompt: blurry\nSteps: 20") and "Seed: 42" in text
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no controlnext settings"):
        read_settings(tmp_path / "plain.png")


# ---------------------------------------------------------------------- uploads
def test_load_upload_refuses_what_it_cannot_use(tmp_path):
    limits = Limits(max_upload_mb=0.05, max_upload_pixels=100 * 100)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UploadError, match="not an image"):
        load_upload(tmp_path / "text.png", limits)
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    with pytest.raises(UploadError, match="GIF images are not supported"):
        load_upload(tmp_path / "anim.gif", limits)
    Image.new("RGB", (101, 100)).save(tmp_path / "wide.png")
    with pytest.raises(UploadError, match=r"101x100 pixels"):
        load_upload(tmp_path / "wide.png", limits)
    noise = np.random.default_rng(0).integers(0, 255, (99, 99, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "heavy.bmp")  # 29 kB: under 0.05 MB, over 0.01 MB
    assert load_upload(tmp_path / "heavy.bmp", limits).size == (99, 99)
    with pytest.raises(UploadError, match="limited to 0.01 MB"):
        load_upload(tmp_path / "heavy.bmp", Limits(max_upload_mb=0.01))
    assert Limits(max_upload_mb=2).max_file_size == 2 * 2**20


# ---------------------------------------------------------------------- model references
def test_model_reference_validation(tmp_path, tiny_sd15_dir):
    assert validate_base_ref(str(tiny_sd15_dir)) == str(tiny_sd15_dir)
    assert validate_base_ref(TINY) == TINY
    assert validate_base_ref("owner/model-name") == "owner/model-name"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        validate_base_ref(str(tmp_path))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickles are refused"):
        validate_base_ref(str(tmp_path / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="hub id"):
        validate_base_ref("/definitely/not/here")
    with pytest.raises(ValueError, match="Choose a base model"):
        validate_base_ref("  ")
    assert validate_control_ref("") is None and validate_control_ref("none") is None
    with pytest.raises(ValueError, match=".safetensors or .bin"):
        validate_control_ref(str(tmp_path / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        validate_lora_ref(str(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError)):  # not a weights file, wherever the cwd is
        validate_control_ref("../../etc/passwd")


def test_default_model_works_offline():
    spec = default_model()
    assert spec.base and spec.controlnext
    if spec.base == TINY:
        assert (spec.width, spec.height) == (64, 64)
    validate_base_ref(spec.base)
    validate_control_ref(spec.controlnext)


# ---------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_loaded():
    return load_model(ModelSpec(label="tiny", base=TINY, controlnext=TINY))


def test_batch_results_reproduce_alone_from_their_png(tiny_loaded, tmp_path):
    pipe = tiny_loaded.pipe
    settings = GenerationSettings(prompt="a red star", steps=2, guidance=3.0, seed=5, batch_size=2, width=64,
                                  height=64, base=TINY, controlnext=TINY, preprocessor="none")  # fmt: skip
    steps = []
    paths, cond_path, _ = generate(pipe, square_condition(), settings, tmp_path, on_step=lambda i, n: steps.append(i))
    assert steps == [1, 2] and len(paths) == 2 and cond_path.is_file()
    assert [p.name for p in paths] == ["00001-0-5.png", "00001-1-6.png"]
    for path in paths:
        data = read_settings(path)
        assert data["batch_size"] == 1 and data["condition_file"] == cond_path.name
        again, _, _ = generate(pipe, Image.open(cond_path), GenerationSettings.from_json(data), tmp_path / "again")
        diff = np.abs(np.asarray(Image.open(path), int) - np.asarray(Image.open(again[0]), int))
        assert diff.max() <= 2, diff.max()  # batched vs single forward: float rounding only
    # The control matters: scale 0 gives a different picture from the same seed.
    off = GenerationSettings.from_json(dict(read_settings(paths[0]), control_scale=0.0))
    no_control, _, _ = generate(pipe, square_condition(), off, tmp_path / "off")
    assert np.abs(np.asarray(Image.open(paths[0]), int) - np.asarray(Image.open(no_control[0]), int)).mean() > 1


def test_lora_loads_with_weight(tmp_path, tiny_loaded):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from controlnext.testing.models import tiny_unet

    unet = tiny_unet("sd15")
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(cfg)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    loaded = load_model(ModelSpec(label="lora", base=TINY, controlnext=TINY, lora=str(lora_file)))
    assert loaded.lora_loaded == str(lora_file)

    def run(pipe):
        out = pipe(prompt="a", control_image=square_condition(), num_inference_steps=1, width=64, height=64,
                   generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
        return out.images[0]

    plain = run(tiny_loaded.pipe)
    loaded.pipe.set_adapters(["user_lora"], adapter_weights=[0.0])
    np.testing.assert_allclose(run(loaded.pipe), plain, atol=1e-5)
    loaded.pipe.set_adapters(["user_lora"], adapter_weights=[1.0])
    assert np.abs(run(loaded.pipe) - plain).max() > 1e-3
    (tmp_path / "lora.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="LoRA files must be .safetensors"):
        load_model(ModelSpec(label="x", base=TINY, controlnext=TINY, lora=str(tmp_path / "lora.bin")))
    with pytest.raises(FileNotFoundError, match="neither an existing local path"):
        load_model(ModelSpec(label="x", base=TINY, controlnext=TINY, lora=str(tmp_path / "missing.safetensors")))


def test_sdxl_model_generates_and_reproduces(tiny_sdxl_dir, tmp_path):
    from controlnext.testing.models import tiny_controlnext

    tiny_controlnext("sdxl").save_pretrained(tmp_path / "cn")
    spec = ModelSpec(label="xl", base=str(tiny_sdxl_dir), controlnext=str(tmp_path / "cn"))
    loaded = load_model(spec)
    assert loaded.family == "sdxl" and type(loaded.pipe).__name__ == "StableDiffusionXLControlNeXtPipeline"
    settings = GenerationSettings(prompt="a red star", steps=2, guidance=3.0, seed=3, width=64, height=64,
                                  base=spec.base, controlnext=spec.controlnext, preprocessor="none")  # fmt: skip
    paths, cond_path, _ = generate(loaded.pipe, square_condition(), settings, tmp_path / "out")
    again, _, _ = generate(loaded.pipe, Image.open(cond_path), GenerationSettings.from_json(read_settings(paths[0])),
                           tmp_path / "again")  # fmt: skip
    first = np.asarray(Image.open(paths[0]), int)
    assert np.abs(first - np.asarray(Image.open(again[0]), int)).max() <= 2
    off = GenerationSettings.from_json(dict(read_settings(paths[0]), control_scale=0.0))
    no_control, _, _ = generate(loaded.pipe, square_condition(), off, tmp_path / "off")
    diff = np.abs(first - np.asarray(Image.open(no_control[0]), int)).mean()
    assert diff > 1


def test_model_cache_reuses_and_evicts(monkeypatch):
    import controlnext.web.models as models

    calls = []
    monkeypatch.setattr(
        models, "load_model", lambda spec: calls.append(spec.base) or models.LoadedModel(spec, None, "")
    )
    cache = ModelCache(capacity=1)
    a, b = ModelSpec("a", "a/a", None), ModelSpec("b", "b/b", None)
    first = cache.get(a)
    assert cache.get(a) is first and calls == ["a/a"]
    cache.get(b)
    cache.get(a)
    assert calls == ["a/a", "b/b", "a/a"]


# ---------------------------------------------------------------------- app configuration and safety
def test_local_host_detection_and_exposed_app_refuses_typed_paths(tmp_path, tiny_sd15_dir):
    from controlnext.web.app import App, WebConfig, is_local_host

    assert is_local_host("127.0.0.1") and is_local_host("localhost") and is_local_host("::1")
    assert not is_local_host("0.0.0.0") and not is_local_host("192.168.1.5") and not is_local_host("example.org")

    spec = ModelSpec(label="tiny", base=TINY, controlnext=TINY)
    local = App(WebConfig(models=[spec], outputs=tmp_path))
    assert local.config.custom_models
    assert local._resolve_spec("tiny", str(tiny_sd15_dir), "", "", 1.0).base == str(tiny_sd15_dir)
    for host, share in (("0.0.0.0", False), ("127.0.0.1", True)):
        exposed = App(WebConfig(host=host, share=share, models=[spec], outputs=tmp_path))
        assert exposed.config.exposed and not exposed.config.custom_models
        with pytest.raises(ValueError, match="only the models it was started with"):
            exposed._resolve_spec("tiny", str(tiny_sd15_dir), "", "", 1.0)
        assert exposed._resolve_spec("tiny", TINY, TINY, "", 1.0).base == TINY
    allowed = App(WebConfig(host="0.0.0.0", models=[spec], outputs=tmp_path, allow_custom_models=True))
    assert allowed._resolve_spec("tiny", str(tiny_sd15_dir), "", "", 1.0).controlnext is None


def test_reproduce_restores_condition_only_from_the_outputs_folder(tmp_path, tiny_loaded):
    from controlnext.web.app import App, WebConfig

    app = App(WebConfig(models=[ModelSpec("tiny", TINY, TINY)], outputs=tmp_path / "out"))
    settings = GenerationSettings(prompt="p", steps=1, width=64, height=64, seed=3, base=TINY, controlnext=TINY,
                                  preprocessor="canny", preprocessor_options={"low": 10, "high": 20})  # fmt: skip
    paths, cond, _ = generate(tiny_loaded.pipe, square_condition(), settings, app.config.outputs)
    values = app.on_load_settings(str(paths[0]))
    assert values[4]["value"] == str(cond) and values[5] == "none" and values[16] == 3
    # A tampered name (path traversal) or hash is ignored.
    assert app._find_condition("../../etc/passwd", "0" * 64) is None
    assert app._find_condition(cond.name, "0" * 64) is None
    (tmp_path / "plain.png").write_bytes(b"not a png")
    import gradio as gr

    with pytest.raises(gr.Error, match="not an image"):
        app.on_load_settings(str(tmp_path / "plain.png"))


def test_cli_web_builds_a_safe_config(tmp_path, tiny_sd15_dir):
    from controlnext.cli import build_parser
    from controlnext.commands.web import build_config

    parser = build_parser()
    args = parser.parse_args(["web", "--outputs", str(tmp_path)])
    cfg = build_config(args)
    assert cfg.host == "127.0.0.1" and not cfg.share and not cfg.exposed
    assert cfg.models[0] == default_model()
    args = parser.parse_args(["web", "--model", str(tiny_sd15_dir), "--size", "64x128", "--host", "0.0.0.0"])
    cfg = build_config(args)
    assert cfg.models[0].base == str(tiny_sd15_dir) and (cfg.models[0].width, cfg.models[0].height) == (64, 128)
    assert cfg.exposed and not cfg.custom_models
    from controlnext.cli import UserError

    with pytest.raises(UserError, match="one --model for each"):
        build_config(parser.parse_args(["web", "--controlnext", "x.safetensors"]))
    with pytest.raises(FileNotFoundError):
        build_config(parser.parse_args(["web", "--model", str(tmp_path / "nope")]))
    from controlnext.web.app import describe

    assert json.loads(describe(cfg))["host"] == "0.0.0.0"


def test_demo_model_is_the_default_when_installed(tmp_path, tiny_sd15_dir, monkeypatch):
    """With the shipped demo's folder layout present, the app opens on it and loads it from disk."""
    import shutil

    import controlnext.shapes.demo as demo
    from controlnext.loading import save_controlnext_file
    from controlnext.testing.models import tiny_controlnext

    root = tmp_path / "demo"
    shutil.copytree(tiny_sd15_dir, root / "base")
    for kind in ("edges", "mask"):
        save_controlnext_file(tiny_controlnext("sd15-training"), root / kind / "controlnext.safetensors")
    monkeypatch.setattr(demo, "demo_assets", lambda: root)
    spec = default_model()
    assert spec.base == str(root / "base") and spec.controlnext.endswith("edges/controlnext.safetensors")
    assert spec.preprocessor == "canny" and dict(spec.preprocessor_options)["per_channel"] is True
    loaded = load_model(spec)
    assert loaded.family == "sd15" and loaded.has_control
    assert loaded.pipe.controlnext_modules[0].config.injection_point == "after_down_block_0"


# ---------------------------------------------------------------------- limits by device and model, time budget
def _on_generate(app, upload=None, **over):
    """``App.on_generate`` with the tiny model's settings, any of them overridden by name."""
    args = dict(
        preset=None, base=TINY, control=TINY, lora="", lora_weight=1.0, upload=upload, preprocessor="none",
        options={}, fit="crop", prompt="a red star", negative="", steps=2, guidance=3.0, control_scale=1.0,
        control_start=0.0, control_end=1.0, seed=1, randomize=False, batch=1, width=64, height=64,
    )  # fmt: skip
    args.update(over)
    return app.on_generate(**args)


class SlowUnet:
    """Wraps a pipeline's UNet forward with a sleep, so a generation lasts long enough to be stopped."""

    def __init__(self, pipe, seconds: float):
        self.unet, self.seconds = pipe.unet, seconds
        self.calls = 0

    def __enter__(self):
        forward = self.unet.forward

        def slow(*args, **kwargs):
            self.calls += 1
            time.sleep(self.seconds)
            return forward(*args, **kwargs)

        self.unet.forward = slow
        return self

    def __exit__(self, *exc):
        del self.unet.forward  # back to the class's forward


def test_limits_depend_on_the_device_and_the_cli_uses_them(tmp_path):
    from controlnext.cli import build_parser
    from controlnext.commands.web import build_config
    from controlnext.web.app import WebConfig
    from controlnext.web.limits import best_device

    cpu, gpu = Limits.for_device("cpu"), Limits.for_device("cuda")
    assert gpu == Limits()  # the class defaults are the GPU limits
    assert cpu.max_side < gpu.max_side and cpu.max_steps < gpu.max_steps and cpu.max_batch < gpu.max_batch
    assert Limits.for_device("cpu", max_side=512).max_side == 512
    assert WebConfig(outputs=tmp_path).limits == Limits.for_device(best_device())
    parser = build_parser()
    cfg = build_config(parser.parse_args(["web", "--outputs", str(tmp_path)]))
    assert cfg.limits == Limits.for_device(best_device())
    cfg = build_config(parser.parse_args(["web", "--max-side", "256", "--max-seconds", "30", "--max-upload-mb", "2"]))
    assert (cfg.limits.max_side, cfg.limits.max_seconds, cfg.limits.max_upload_mb) == (256, 30, 2)
    assert cfg.limits.max_steps == Limits.for_device(best_device()).max_steps
    from controlnext.cli import UserError

    with pytest.raises(UserError, match="--max-seconds"):
        build_config(parser.parse_args(["web", "--max-seconds", "0"]))
    with pytest.raises(UserError, match="--upload-max-age"):
        build_config(parser.parse_args(["web", "--upload-max-age", "0"]))


def test_a_model_with_a_native_size_refuses_larger_outputs(tmp_path):
    import gradio as gr

    from controlnext.web.app import App, WebConfig
    from controlnext.web.models import demo_models

    for spec in demo_models():  # the shipped demo (when installed) makes its native 64x64 only
        assert spec.max_side == spec.width == spec.height == 64
    native = ModelSpec("native 64", TINY, TINY, preprocessor="none", width=64, height=64, max_side=64)
    app = App(WebConfig(models=[native], outputs=tmp_path, limits=Limits(max_side=512)))
    with pytest.raises(gr.Error, match=r"native 64 makes images up to 64x64 pixels \(its native size\); got 128x64"):
        _on_generate(app, preset="native 64", upload=str(_condition_file(tmp_path)), width=128)
    # The limit belongs to the base model: another base typed into the same preset gets the app's limit.
    assert app._resolve_spec("native 64", "owner/other", "", "", 1.0).max_side is None
    assert app.max_side(native) == 64 and app.size_slider(native, 64)["interactive"] is False
    assert not list(tmp_path.glob("*-*-*"))  # no result folder: nothing was generated


def _condition_file(folder):
    path = folder / "condition-upload.png"
    if not path.exists():
        square_condition().save(path)
    return path


def test_time_budget_stops_a_generation_with_a_message(tmp_path, tiny_loaded):
    import gradio as gr

    from controlnext.web.app import App, WebConfig

    app = App(WebConfig(models=[ModelSpec("tiny", TINY, TINY)], outputs=tmp_path / "out",
                        limits=Limits(max_seconds=1.0)))  # fmt: skip
    app.cache._items[app.cache.key(ModelSpec("tiny", TINY, TINY))] = tiny_loaded
    cond = _condition_file(tmp_path)
    t0 = time.monotonic()
    with SlowUnet(tiny_loaded.pipe, 0.2) as slow, pytest.raises(gr.Error, match="time budget of 1 s") as err:
        _on_generate(app, preset="tiny", upload=str(cond), steps=100)
    elapsed = time.monotonic() - t0
    assert re.search(r"Stopped after \d+ of 100 denoising steps", str(err.value)), err.value
    assert slow.calls < 20 and elapsed < 10, (slow.calls, elapsed)  # 100 steps would take > 20 s
    assert not list((tmp_path / "out").rglob("*.png"))  # nothing of a stopped generation is saved
    # Within the budget the same request completes.
    app.config.limits = Limits(max_seconds=60)
    gallery, files, _, _ = _on_generate(app, preset="tiny", upload=str(cond), steps=2)
    assert len(files) == 1 and len(gallery) == 2


# ---------------------------------------------------------------------- the HTTP API of a running app
# Every request goes to 127.0.0.1 with a timeout; each test makes a bounded number of them.
FILE_META = {"_type": "gradio.FileData"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _upload(url: str, path, origin: str | None = None) -> tuple[int, bytes]:
    """POST one file to gradio's upload route as a browser form would."""
    data = path.read_bytes()
    body = (
        b'--cnxboundary\r\nContent-Disposition: form-data; name="files"; filename="' + path.name.encode() + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--cnxboundary--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=cnxboundary"}
    if origin:
        headers["Origin"] = origin
    return _http(f"{url}gradio_api/upload", body, headers)


def _call(url: str, api_name: str, data: list, timeout: float = 60) -> tuple[str, Any]:
    """One event through gradio's REST API: ("complete", outputs) or ("error", message)."""
    status, body = _http(f"{url}gradio_api/call/{api_name}", json.dumps({"data": data}).encode(),
                         {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, (status, body[:300])
    event_id = json.loads(body)["event_id"]
    _, stream = _http(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=timeout)
    kind, payload = None, None
    for line in stream.decode().splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind in ("complete", "error"):
            payload = json.loads(line[6:])
            break
    if kind == "error":
        payload = (payload or {}).get("error") if isinstance(payload, dict) else payload
    return kind, payload


def _api_data(app, api_name: str, **values) -> list:
    """An event's positional API data from its fields by name; option widgets ("canny.low") default as registered."""
    from controlnext.preprocess import REGISTRY

    fields = {f"{name}.{o.name}": o.default for name, pre in REGISTRY.items() for o in pre.options} | values
    return [fields[name] for name in app.api_inputs[api_name]]


def _preview_data(app, upload, **over) -> list:
    return _api_data(app, "on_preview", **{"upload": upload, "preprocessor": "none", "width": 64, "height": 64,
                                           "fit": "crop", **over})  # fmt: skip


def _generate_data(app, upload, **over) -> list:
    args = dict(
        preset="tiny", base=TINY, control=TINY, lora="", lora_weight=1.0, upload=upload, preprocessor="none",
        fit="crop", prompt="a red star", negative="", steps=2, guidance=3.0, control_scale=1.0, control_start=0.0,
        control_end=1.0, seed=1, randomize=False, batch=1, width=64, height=64,
    )  # fmt: skip
    args.update(over)
    return _api_data(app, "generate", **args)


def _start(root, tiny_sd15_dir, **config):
    from controlnext.web.app import WebConfig, launch

    models = [
        ModelSpec("tiny", TINY, TINY, preprocessor="none", width=64, height=64, steps=2),
        ModelSpec("local folder", str(tiny_sd15_dir), None, preprocessor="none", width=64, height=64),
    ]
    config = WebConfig(port=_free_port(), models=models, outputs=root / "outputs",
                       limits=Limits(max_side=256, max_seconds=120), **config)  # fmt: skip
    demo, url, share = launch(config, block=False, quiet=True)
    assert share is None and url.startswith("http://127.0.0.1:")
    return demo, url


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_sd15_dir, tiny_loaded):
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio-cache"))  # this server's own upload cache, to inspect
        demo, url = _start(root, tiny_sd15_dir)
        app = demo.controlnext_app
        app.cache._items[app.cache.key(app.config.models[0])] = tiny_loaded  # no second load of the tiny model
        try:
            yield SimpleNamespace(demo=demo, url=url, app=app, root=root, cache=root / "gradio-cache",
                                  outputs=root / "outputs")  # fmt: skip
        finally:
            demo.close()


def _private_picture(folder) -> tuple:
    """A 0700 folder holding a noise picture only the server's user can read (and a result-like PNG)."""
    private = folder / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    pixels = np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(private / "secret.png")
    save_png(Image.fromarray(pixels), private / "result.png", GenerationSettings(prompt="private prompt"))
    return private, pixels


def _contains_picture(folder, pixels) -> list:
    """Files under ``folder`` that hold the private prompt or decode to (a lossy copy of) the private pixels."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
            # Two unrelated noise pictures differ by ~85 per pixel on average; a WebP copy by far less than 30.
            same = rgb.shape == pixels.shape and np.abs(rgb - pixels).mean() < 30
        except Exception:  # noqa: BLE001 - anything that is not a picture is not the private picture
            same = False
        if same or b"private prompt" in path.read_bytes():
            found.append(path)
    return found


def test_api_refuses_files_the_server_did_not_receive(api, tmp_path):
    """A client naming a server path gets one refusal, whether or not the path exists, and nothing of the file."""
    from controlnext.web.security import REFUSED

    private, pixels = _private_picture(tmp_path)
    missing = private / "missing.png"
    uploaded_dir = str(api.cache)
    named = [
        {"path": str(private / "secret.png")},
        {"path": str(missing)},
        {"path": f"{uploaded_dir}/../../{tmp_path.name}/private/secret.png"},  # through the cache folder
        {"path": str(private / "secret.png"), "url": None, "orig_name": "secret.png"},
    ]
    numbers = [4, 2, 64, 64, 2, 2.0, 2.0, 7, 127, 0.02, 1.0, 1, 4, 2]
    for payload in named:
        # Image inputs: gradio passes a payload without its file marker through; the app refuses it.
        assert _call(api.url, "on_preview", _preview_data(api.app, payload)) == ("error", REFUSED), payload
        assert _call(api.url, "generate", _generate_data(api.app, payload)) == ("error", REFUSED), payload
        video = [payload, None, *numbers, False, "drawn poses"]
        assert _call(api.url, "generate_video", video) == ("error", REFUSED), payload
        # File inputs: gradio itself refuses a payload without the marker, before looking at the file.
        kind, message = _call(api.url, "on_load_settings", [payload])
        assert kind == "error" and "'meta' field must be explicitly provided" in message, message
    # With gradio's own file marker gradio refuses it itself, with a text that does not depend on existence.
    for path in (private / "secret.png", missing):
        kind, message = _call(api.url, "on_preview", _preview_data(api.app, {"path": str(path), "meta": FILE_META}))
        assert kind == "error" and "not uploaded" in message and "exist" not in message.lower()
    # Nothing of the private file was copied into the outputs folder or gradio's cache.
    assert not _contains_picture(api.outputs, pixels) and not _contains_picture(api.cache, pixels)


def test_api_happy_path_through_a_real_upload_and_cross_site_uploads_refused(api, tmp_path):
    from controlnext.web.generation import read_settings

    square_condition().save(tmp_path / "square.png")
    own_origin = api.url.rstrip("/")
    status, body = _upload(api.url, tmp_path / "square.png", origin=own_origin)  # as the app's own page does
    assert status == 200, body
    (path,) = json.loads(body)
    payload = {"path": path, "meta": FILE_META, "orig_name": "square.png"}
    kind, preview = _call(api.url, "on_preview", _preview_data(api.app, payload))
    assert kind == "complete", preview
    status, png = _http(preview[0]["url"])
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    assert status == 200 and np.abs(shown - np.asarray(square_condition())).mean() < 3  # gradio shows WebP
    kind, outputs = _call(api.url, "generate", _generate_data(api.app, payload, seed=21))
    assert kind == "complete", outputs
    gallery, files, info, seed = outputs
    assert seed == 21 and len(files) == 1 and "1 image(s)" in info
    (result,) = api.outputs.glob("*/*-0-21.png")
    assert read_settings(result)["seed"] == 21
    # A restored condition (a file the app put in its cache itself) is accepted too.
    kind, restored = _call(api.url, "on_load_settings", [_uploaded(api.url, result)])
    assert kind == "complete", restored
    kind, preview = _call(api.url, "on_preview", _preview_data(api.app, restored[4]))
    assert kind == "complete", preview

    # A page on another site (or a sandboxed frame, Origin "null") cannot upload or start events.
    before = set(api.demo.upload_file_set)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "cross.png")
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        status, body = _upload(api.url, tmp_path / "cross.png", origin=origin)
        assert status == 403 and b"Cross-site" in body, (origin, status, body)
        call = json.dumps({"data": _preview_data(api.app, None)}).encode()
        status, _ = _http(f"{api.url}gradio_api/call/on_preview", call,
                          {"Content-Type": "application/json", "Origin": origin})  # fmt: skip
        assert status == 403
    assert set(api.demo.upload_file_set) == before
    assert not [p for p in api.cache.rglob("cross.png")]


def _uploaded(url: str, path) -> dict:
    status, body = _upload(url, path)
    assert status == 200, body
    return {"path": json.loads(body)[0], "meta": FILE_META, "orig_name": path.name}


def test_config_shows_no_absolute_server_path(api, tiny_sd15_dir):
    status, body = _http(f"{api.url}config")
    assert status == 200
    text = body.decode()
    for secret in (str(tiny_sd15_dir), str(api.root), str(api.outputs), str(api.cache)):
        assert secret not in text, secret
    paths = [v for v in re.findall(r'"(/[^"]+)"', text) if not v.startswith("/gradio_api")]
    assert not paths, paths
    # The page names the local model by its last path parts, and the server maps the name back.
    shown = api.app.show(str(tiny_sd15_dir))
    assert f'"{shown}"' in text and not shown.startswith("/")
    assert api.app._resolve_spec("local folder", shown, "", "", 1.0).base == str(tiny_sd15_dir)


def test_upload_cache_is_deleted_and_then_refused(tmp_path, tiny_sd15_dir):
    from controlnext.web.security import REFUSED

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
        demo, url = _start(tmp_path, tiny_sd15_dir, upload_max_age=1)
        try:
            square_condition().save(tmp_path / "square.png")
            payload = _uploaded(url, tmp_path / "square.png")
            deadline = time.monotonic() + 20
            while Path(payload["path"]).exists():
                assert time.monotonic() < deadline, "the upload was not deleted from gradio's cache"
                time.sleep(0.5)
            kind, message = _call(url, "on_preview", _preview_data(demo.controlnext_app, {"path": payload["path"]}))
            assert (kind, message) == ("error", REFUSED)
        finally:
            demo.close()


def test_dropped_request_frees_the_slot(api, tiny_loaded, tmp_path):
    """The page closes while its generation runs: the generation stops and the next request gets the slot."""
    import http.client
    import uuid
    from urllib.parse import urlsplit

    square_condition().save(tmp_path / "square.png")
    payload = _uploaded(api.url, tmp_path / "square.png")
    _, config = _http(f"{api.url}config")
    fn_index = next(d["id"] for d in json.loads(config)["dependencies"] if d.get("api_name") == "generate")
    before = set(api.outputs.rglob("*.png"))
    host = urlsplit(api.url)
    session = uuid.uuid4().hex[:10]
    with SlowUnet(tiny_loaded.pipe, 0.25) as slow:  # 150 steps: about 40 s when nothing stops it
        body = {"data": _generate_data(api.app, payload, steps=150, seed=31), "fn_index": fn_index,
                "session_hash": session, "event_data": None, "trigger_id": None}  # fmt: skip
        status, joined = _http(f"{api.url}gradio_api/queue/join", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
        assert status == 200, joined
        stream = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        stream.request("GET", f"/gradio_api/queue/data?session_hash={session}")
        response = stream.getresponse()
        deadline = time.monotonic() + 60
        while True:  # until denoising has started
            line = response.readline()
            assert line and time.monotonic() < deadline, "the abandoned generation never started"
            if b"progress" in line:
                break
        stream.close()  # the page goes away
        t0 = time.monotonic()
        kind, outputs = _call(api.url, "generate", _generate_data(api.app, payload, steps=2, seed=32), timeout=30)
        waited = time.monotonic() - t0
        calls = slow.calls
    assert kind == "complete", outputs
    assert waited < 15, f"the next request waited {waited:.0f} s for the abandoned one"
    assert calls < 60, calls  # the abandoned generation stopped within a few steps (150 steps = 150+ calls)
    new = {p.name for p in set(api.outputs.rglob("*.png")) - before}
    assert not any(name.endswith("-31.png") for name in new), new  # nothing of the abandoned one was saved
    assert any(name.endswith("-0-32.png") for name in new), new


def test_same_site_middleware_lets_only_this_servers_pages_post():
    import asyncio

    from controlnext.web.security import SameSiteMiddleware

    passed = []

    async def inner(scope, receive, send):
        passed.append(scope["method"])

    async def request(method, **headers):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": "/gradio_api/upload",
                 "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
        passed.clear()
        await SameSiteMiddleware(inner, sites={"abc.gradio.live"})(scope, None, send)
        return "passed" if passed else sent[0]["status"]

    def run(method, **headers):
        return asyncio.run(request(method, **headers))

    host = {"host": "127.0.0.1:7860"}
    assert run("POST", **host) == "passed"  # gradio_client, curl: no Origin
    assert run("POST", origin="http://127.0.0.1:7860", **host) == "passed"
    assert run("POST", origin="https://abc.gradio.live", **host) == "passed"  # the share link
    assert run("POST", origin="https://app.example", x_forwarded_host="app.example", **host) == "passed"
    assert run("GET", origin="http://evil.example", **host) == "passed"  # reading is CORS's business
    for origin in ("http://evil.example", "null", "http://127.0.0.1:7861", "http://localhost:7860"):
        assert run("POST", origin=origin, **host) == 403, origin
    assert run("POST", sec_fetch_site="cross-site", **host) == 403


# ---------------------------------------------------------------------- preprocessor options from the registry
# The options the server sets itself (never a widget): model files from its settings, the pose canvas from the output
# size, and no downloads from a page.
SERVER_SET = {"pose": {"model_dir", "width", "height"}, "depth": {"model", "allow_download"}}


def _other_value(opt):
    """A valid value of ``opt`` other than its default."""
    if opt.type is bool:
        return not opt.default
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    value = opt.high if opt.default != opt.high else opt.low
    return opt.type(value)


def _page_config(demo) -> dict:
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    return {c["props"]["elem_id"]: c for c in config["components"] if c.get("props", {}).get("elem_id")}


def test_every_registry_option_is_a_widget_or_server_set_and_reaches_the_preprocessor(api, tmp_path, monkeypatch):
    import dataclasses

    from controlnext.preprocess import REGISTRY

    page = _page_config(api.demo)
    for name, pre in REGISTRY.items():
        for opt in pre.options:
            elem_id = f"cnx-{name}-{opt.name.replace('_', '-')}"
            if opt.name in SERVER_SET.get(name, ()):
                assert elem_id not in page, elem_id
                continue
            assert not opt.path, (name, opt.name)  # a path option is never typed into the page
            props = page[elem_id]["props"]
            if opt.type is bool:
                assert page[elem_id]["type"] == "checkbox", elem_id
            elif opt.choices:
                assert [c[1] for c in props["choices"]] == list(opt.choices), elem_id
            else:
                assert (props["minimum"], props["maximum"], props["step"]) == (opt.low, opt.high, opt.step), elem_id
    choices = page["cnx-preprocessor"]["props"]["choices"]
    assert [tuple(c) for c in choices] == [(p.label or p.name, p.name) for p in REGISTRY.values()]

    # Every widget's value reaches the preprocessor function (through the HTTP API: the page's own path).
    square_condition().save(tmp_path / "square.png")
    payload = _uploaded(api.url, tmp_path / "square.png")
    fixed = {"pose": {"model_dir": api.app.config.pose_models, "width": 64, "height": 64},
             "depth": {"model": api.app.config.depth_model, "allow_download": False}}  # fmt: skip
    seen = {}

    def record(image, **options):
        seen.update(options)
        return Image.new("RGB", (64, 64))

    for name, pre in REGISTRY.items():
        seen.clear()
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(pre, fn=record))
        given = {o.name: _other_value(o) for o in pre.options if o.name not in SERVER_SET.get(name, ())}
        widgets = {f"{name}.{k}": v for k, v in given.items()}
        kind, out = _call(api.url, "on_preview", _preview_data(api.app, payload, preprocessor=name, **widgets))
        assert kind == "complete", (name, out)
        expected = {o.name: o.values.get(given[o.name], given[o.name]) for o in pre.options if o.name in given}
        assert seen == expected | fixed.get(name, {}), name


def test_bad_option_values_give_one_clear_message(api, tmp_path):
    import gradio as gr

    square_condition().save(tmp_path / "square.png")
    payload = _uploaded(api.url, tmp_path / "square.png")
    cases = [
        ({"segment.segments": 1000}, "segment", "segment option 'segments' must lie in [1, 64], got 1000."),
        ({"canny.low": float("nan")}, "canny", "canny option 'low' must be a finite number, got nan."),
        ({"scribble.mode": "paint"}, "scribble", "scribble option 'mode' must be one of sketch, photo; got 'paint'."),
    ]
    for widgets, name, message in cases:
        for api_name, data in (
            ("on_preview", _preview_data(api.app, payload, preprocessor=name, **widgets)),
            ("generate", _generate_data(api.app, payload, preprocessor=name, **widgets)),
        ):
            assert _call(api.url, api_name, data) == ("error", message), (api_name, widgets)
    # A Python caller naming an option the server sets (a model folder) is refused too, with the page's options.
    app = api.app
    with pytest.raises(gr.Error, match=r"takes no option 'model_dir' from the page; its options here: min_score"):
        _on_generate(app, preset="tiny", upload=str(_condition_file(tmp_path)), preprocessor="pose",
                     options={"model_dir": "/etc"})  # fmt: skip
    with pytest.raises(gr.Error) as err:
        _on_generate(app, preset="tiny", upload=str(_condition_file(tmp_path)), preprocessor="canny",
                     options={"high": float("nan")})  # fmt: skip
    assert err.value.message == "canny option 'high' must be a finite number, got nan."


def test_preset_and_png_restore_the_preprocessor_options(api, tmp_path):
    from controlnext.preprocess import REGISTRY
    from controlnext.web.app import App

    app = api.app
    options = {"mode": "photo", "threshold": 99, "thickness": 5, "invert": "yes"}
    cond = _condition_file(tmp_path)
    _, files, _, _ = _on_generate(app, preset="tiny", upload=str(cond), preprocessor="scribble", options=options)
    assert read_settings(files[0])["preprocessor_options"] == options
    restored = dict(zip(App.LOADED_FIELDS, app.on_load_settings(files[0])))
    assert restored["preprocessor"] == "none" and restored["options"] == {"scribble": options}
    # Through the page: "Load settings" fills the scribble widgets with the saved values.
    kind, outputs = _call(api.url, "on_load_settings", [_uploaded(api.url, Path(files[0]))])
    assert kind == "complete", outputs
    widget_names = [n for n in app.api_inputs["on_preview"] if "." in n]
    shown = dict(zip(widget_names, outputs[len(App.LOADED_FIELDS) - 1 :]))
    assert {k: shown[f"scribble.{k}"] for k in options} == options
    # A preset's options land in its preprocessor's widgets, the others at their defaults.
    demo_like = ModelSpec("edges", TINY, TINY, preprocessor="canny", preprocessor_options=(("per_channel", True),))
    app.presets["edges"] = demo_like
    try:
        preset = dict(zip(App.PRESET_FIELDS, app.on_preset("edges")))
    finally:
        del app.presets["edges"]
    assert preset["options"] == {"canny": {**REGISTRY["canny"].defaults(), "per_channel": True}}


# ---------------------------------------------------------------------- the video tab without the video extra
def test_video_tab_without_the_video_extra_says_what_to_install(tmp_path, monkeypatch):
    """With only the `web` extra (imageio missing) the tab shows the install line instead of its form."""
    import sys

    import gradio as gr

    from controlnext.web.app import WebConfig, build_app
    from controlnext.web.video import VideoSettings

    monkeypatch.setitem(sys.modules, "imageio", None)  # `import imageio` fails, as in a web-only install
    demo = build_app(WebConfig(models=[ModelSpec("tiny", TINY, TINY)], outputs=tmp_path / "out"))
    page = _page_config(demo)
    note = page["cnx-video-note"]["props"]["value"]
    assert 'pip install "controlnext[video]"' in note and "imageio" in note, note
    # Nothing to upload to: the form's row is hidden.
    reference = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "cnx-ref")
    parents = []
    block = reference
    while block is not None:
        parents.append(block)
        block = getattr(block, "parent", None)
    assert any(getattr(b, "visible", True) is False for b in parents)
    # A request that gets past the page (the API) gets the same sentence, not a ModuleNotFoundError.
    tab = demo.controlnext_app.video
    square_condition().save(tmp_path / "ref.png")
    (tmp_path / "poses.mp4").write_bytes(b"\0")
    numbers = [4, 2, 64, 64, 2, 2.0, 2.0, 7, 127, 0.02, 1.0, 1, 4, 2]
    with pytest.raises(gr.Error) as err:
        tab.generate(str(tmp_path / "ref.png"), str(tmp_path / "poses.mp4"), *numbers, False, "drawn poses")
    assert 'pip install "controlnext[video]"' in err.value.message and "imageio" in err.value.message
    # DWPose (onnxruntime) is named the same way when it is the missing part.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=r"DWPose needs the `video` extra.*onnxruntime.*controlnext\[video\]"):
        tab.pose_frames(str(tmp_path / "poses.mp4"), VideoSettings(pose_source="a person (DWPose)"), None)


# ---------------------------------------------------------------------- transformer bases (SD3, Flux)
@pytest.fixture(scope="module")
def tiny_dit_models(tmp_path_factory):
    """Tiny SD3 and Flux base folders (saved by the stock diffusers pipelines) and a control module for each."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from controlnext.testing.models import tiny_controlnext, tiny_dit_pipeline_components

    root = tmp_path_factory.mktemp("dit_models")
    out = {}
    for family, cls in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        cls(**tiny_dit_pipeline_components(family, root / family / "src")).save_pretrained(root / family / "model")
        tiny_controlnext(family, seed=1).save_pretrained(root / family / "module")
        out[family] = ModelSpec(family, str(root / family / "model"), str(root / family / "module"),
                                preprocessor="none", width=64, height=64, steps=2, guidance=3.5)  # fmt: skip
    return out


@pytest.mark.parametrize(
    "family, pipeline", [("sd3", "StableDiffusion3ControlNeXtPipeline"), ("flux", "FluxControlNeXtPipeline")]
)
def test_transformer_models_generate_through_the_app(tiny_dit_models, tmp_path, family, pipeline):
    import gradio as gr

    from controlnext.web.app import App, WebConfig

    spec = tiny_dit_models[family]
    app = App(WebConfig(models=[spec], outputs=tmp_path / "out", limits=Limits(max_side=512)))
    cond = _condition_file(tmp_path)
    gallery, files, _, _ = _on_generate(app, preset=family, base=spec.base, control=spec.controlnext,
                                        upload=str(cond), guidance=3.5, seed=4)  # fmt: skip
    loaded = app.cache.get(spec)
    assert loaded.family == family and type(loaded.pipe).__name__ == pipeline and loaded.has_control
    assert len(files) == 1 and len(gallery) == 2
    # The PNG holds what reproduces it alone, through the same generation function.
    data = read_settings(files[0])
    assert data["base"] == spec.base and data["guidance"] == 3.5 and data["negative_prompt"] == ""
    first = np.asarray(Image.open(files[0]), int)
    again, _, _ = generate(loaded.pipe, square_condition(), GenerationSettings.from_json(data), tmp_path / "again")
    assert np.abs(first - np.asarray(Image.open(again[0]), int)).max() <= 2
    off, _, _ = generate(loaded.pipe, square_condition(), GenerationSettings.from_json(dict(data, control_scale=0.0)),
                         tmp_path / "off")  # fmt: skip
    assert np.abs(first - np.asarray(Image.open(off[0]), int)).mean() > 1  # the control matters
    # A size the patching cannot take (a multiple of 8, not of the VAE factor 8 x patch 2) is one clear message.
    with pytest.raises(gr.Error, match=r"whole 16-pixel patches .* got 72x64: choose multiples of 16"):
        _on_generate(app, preset=family, base=spec.base, control=spec.controlnext, upload=str(cond), width=72)
    # Flux.1-dev is guidance-distilled: a negative prompt would be silently unused, so it is refused; SD3 takes one.
    if family == "flux":
        with pytest.raises(gr.Error, match="guidance-distilled and uses no negative prompt"):
            _on_generate(app, preset=family, base=spec.base, control=spec.controlnext, upload=str(cond),
                         negative="blurry")  # fmt: skip
    else:
        _, files, _, _ = _on_generate(app, preset=family, base=spec.base, control=spec.controlnext,
                                      upload=str(cond), negative="blurry", guidance=3.5, seed=4)  # fmt: skip
        assert read_settings(files[0])["negative_prompt"] == "blurry"
        assert np.abs(first - np.asarray(Image.open(files[0]), int)).mean() > 0  # the negative prompt is used


def test_a_flux_module_on_an_sd3_base_is_one_clear_message(tiny_dit_models, tmp_path):
    import gradio as gr

    from controlnext.web.app import App, WebConfig

    sd3, flux = tiny_dit_models["sd3"], tiny_dit_models["flux"]
    mixed = ModelSpec("mixed", sd3.base, flux.controlnext, preprocessor="none", width=64, height=64, steps=2)
    app = App(WebConfig(models=[mixed], outputs=tmp_path / "out"))
    with pytest.raises(gr.Error, match=r"'flux' module \(for flux transformers\) but the transformer is sd3"):
        _on_generate(app, preset="mixed", base=sd3.base, control=flux.controlnext,
                     upload=str(_condition_file(tmp_path)))  # fmt: skip
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))
