"""The web app's logic without a browser: validation, limits, model references, generation and PNG settings."""

from __future__ import annotations

import json

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
