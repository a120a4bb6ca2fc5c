"""Tiny SD1.5 and SDXL ControlNeXt pipelines end to end, offline."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from controlnext.pipelines import (
    StableDiffusionControlNeXtImg2ImgPipeline,
    StableDiffusionControlNeXtInpaintPipeline,
    StableDiffusionControlNeXtPipeline,
    StableDiffusionXLControlNeXtImg2ImgPipeline,
    StableDiffusionXLControlNeXtInpaintPipeline,
    StableDiffusionXLControlNeXtPipeline,
)
from controlnext.testing.models import tiny_controlnext, tiny_pipeline_components

PIPES = {
    ("sd15", "txt2img"): StableDiffusionControlNeXtPipeline,
    ("sd15", "img2img"): StableDiffusionControlNeXtImg2ImgPipeline,
    ("sd15", "inpaint"): StableDiffusionControlNeXtInpaintPipeline,
    ("sdxl", "txt2img"): StableDiffusionXLControlNeXtPipeline,
    ("sdxl", "img2img"): StableDiffusionXLControlNeXtImg2ImgPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLControlNeXtInpaintPipeline,
}
VARIANT = {"sd15": "sd15-training", "sdxl": "sdxl"}


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("comps")
    return {fam: tiny_pipeline_components(fam, root / fam) for fam in ("sd15", "sdxl")}


def make(components, family, task="txt2img", module=None):
    pipe = PIPES[(family, task)](**components[family], controlnext=module or tiny_controlnext(VARIANT[family]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, task="txt2img", seed=0, **kw):
    extra = {}
    if task != "txt2img":
        extra["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
        extra["strength"] = 0.75
    if task == "inpaint":
        extra["mask_image"] = torch.ones(1, 1, 64, 64)
    kw.setdefault("control_image", torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5)))
    return pipe(
        "a red star",
        num_inference_steps=kw.pop("steps", 3),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
        **kw,
    ).images


@pytest.mark.parametrize("family,task", sorted(PIPES))
def test_pipeline_runs_and_control_takes_effect(components, family, task):
    pipe = make(components, family, task)
    with_control = run(pipe, task)
    without = run(pipe, task, controlnext_conditioning_scale=0.0)
    assert with_control.shape == (1, 64, 64, 3) and np.isfinite(with_control).all()
    assert np.abs(with_control - without).max() > 1e-3
    # The UNet is left without hooks after the call.
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.down_blocks[0]._forward_pre_hooks


def test_scale_zero_equals_base_pipeline_bitwise(components):
    from diffusers import StableDiffusionPipeline

    pipe = make(components, "sd15")
    base = StableDiffusionPipeline(**components["sd15"])
    base.set_progress_bar_config(disable=True)
    ours = run(pipe, controlnext_conditioning_scale=0.0)
    theirs = base(
        "a red star",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=64,
        width=64,
    ).images
    assert np.array_equal(ours, theirs)


def test_guidance_window_controls_which_steps_get_control(components):
    pipe = make(components, "sd15")
    active = []
    module = pipe.controlnext
    hook = module.time_embedding.register_forward_hook(lambda *a: active.append(True))
    steps = []

    def on_step(p, i, t, kw):
        steps.append(len(active))
        return {}

    run(pipe, steps=4, control_guidance_start=0.5, control_guidance_end=1.0, callback_on_step_end=on_step)
    hook.remove()
    # No encoder call in steps 0 and 1, one per step in steps 2 and 3 (cumulative counts after each step).
    assert steps == [0, 0, 1, 2]
    full = run(pipe, steps=4)
    window = run(pipe, steps=4, control_guidance_start=0.0, control_guidance_end=0.5)
    assert np.abs(full - window).max() > 1e-4


def test_encoder_runs_once_per_step_under_guidance(components):
    pipe = make(components, "sdxl")
    calls = []
    pipe.controlnext.time_embedding.register_forward_hook(lambda *a: calls.append(1))
    stem = []
    pipe.controlnext.embedding.register_forward_hook(lambda *a: stem.append(1))
    run(pipe, steps=3, guidance_scale=5.0, num_images_per_prompt=2)
    assert len(calls) == 3 and len(stem) == 1


def test_batch_of_prompts_with_one_condition_each(components):
    pipe = make(components, "sd15")
    g = torch.Generator().manual_seed(1)
    conds = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    out = pipe(
        ["a red star", "a blue circle"],
        control_image=conds,
        num_images_per_prompt=2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="cannot be spread"):
        pipe(["a", "b"], control_image=[conds[0]] * 3, num_inference_steps=1, output_type="np")


def test_multiple_modules_in_a_pipeline(components):
    a, b = tiny_controlnext("sd15-training", seed=1), tiny_controlnext("sd15", out_channels=64, seed=2)
    pipe = make(components, "sd15", module=[a, b])
    cond = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    both = run(pipe, control_image=cond, controlnext_conditioning_scale=[1.0, 1.0])
    only_a = run(pipe, control_image=cond, controlnext_conditioning_scale=[1.0, 0.0])
    assert np.abs(both - only_a).max() > 1e-4
    with pytest.raises(ValueError, match="one each"):
        run(pipe, control_image=cond, controlnext_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one each"):
        run(pipe, control_image=cond[:1] * 3)


def test_save_and_load_round_trip_is_bitwise(components, tmp_path):
    pipe = make(
        components,
        "sd15",
        module=[tiny_controlnext("sd15-training", seed=1), tiny_controlnext("sd15-training", seed=2)],
    )
    cond = [torch.rand(3, 64, 64)] * 2
    before = run(pipe, control_image=cond)
    pipe.save_pretrained(tmp_path / "pipe")
    again = StableDiffusionControlNeXtPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert len(again.controlnext_modules) == 2
    for m1, m2 in zip(pipe.controlnext_modules, again.controlnext_modules):
        for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
            assert torch.equal(v1, v2), k
    assert np.array_equal(before, run(again, control_image=cond))


def test_lora_plus_control(components, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from controlnext.testing.models import tiny_unet

    donor = tiny_unet("sd15")
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionControlNeXtPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor))
    pipe = make(components, "sd15")
    plain = run(pipe)
    pipe.load_lora_weights(tmp_path)
    with_lora = run(pipe)
    no_control = run(pipe, controlnext_conditioning_scale=0.0)
    pipe.unload_lora_weights()
    assert np.abs(with_lora - plain).max() > 1e-4 and np.abs(with_lora - no_control).max() > 1e-4
    assert np.array_equal(run(pipe), plain)


def test_wrong_module_and_missing_condition_are_clear(components):
    with pytest.raises(ValueError, match="does not fit this sd15 UNet"):
        run(make(components, "sd15", module=tiny_controlnext("sdxl", out_channels=320)))
    pipe = make(components, "sd15")
    with pytest.raises(ValueError, match="control_image is required"):
        pipe("x", num_inference_steps=1)
    with pytest.raises(ValueError, match="control_guidance_start"):
        run(pipe, control_guidance_start=0.8, control_guidance_end=0.2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "wide"])
def test_condition_formats(components, mode, caplog):
    pipe = make(components, "sd15")
    rng = np.random.default_rng(0)
    if mode == "L":
        img = PIL.Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L")
    elif mode == "RGBA":
        img = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA")
    elif mode == "I;16":
        img = PIL.Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16))
    else:
        img = PIL.Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    out = run(pipe, control_image=img, height=64, width=64)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    if mode == "wide":
        assert "stretched" in caplog.text


def test_model_cpu_offload_hooks_compose(components):
    # On CPU the offload "device" is the CPU itself, but accelerate's hooks are installed on every component, so
    # this checks that our UNet hooks and the excluded control module work inside that hook chain.
    pipe = make(components, "sd15")
    before = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert "controlnext" in pipe._exclude_from_cpu_offload
    assert hasattr(pipe.unet, "_hf_hook") and not hasattr(pipe.controlnext, "_hf_hook")
    assert np.array_equal(run(pipe), before)
    pipe.remove_all_hooks()


def test_unet_weights_keep_base_restores_exactly_and_refuses_without(components, tmp_path):
    from controlnext.loading import save_unet_weights

    pipe = make(components, "sd15", module=tiny_controlnext("sd15-training"))
    params = dict(pipe.unet.named_parameters())
    names = [n for n in params if "to_out" in n]
    base = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n].add_(0.5)
    save_unet_weights(pipe.unet, tmp_path / "w.safetensors", names)  # values: base + 0.5
    with torch.no_grad():
        for n in names:
            params[n].copy_(base[n])
    assert pipe.load_unet_weights(tmp_path / "w.safetensors", mode="values", keep_base=True) == "values"
    trained = {n: params[n].detach().clone() for n in names}
    assert all(not torch.equal(trained[n], base[n]) for n in names)
    with pipe.base_unet_weights():
        assert all(torch.equal(params[n], base[n]) for n in names)
    assert all(torch.equal(params[n], trained[n]) for n in names)
    pipe.unload_unet_weights()
    assert all(torch.equal(params[n], base[n]) for n in names)
    pipe.load_unet_weights(tmp_path / "w.safetensors", mode="values")  # no base copy kept
    with pytest.raises(ValueError, match="keep_base=True"), pipe.base_unet_weights():
        pass
