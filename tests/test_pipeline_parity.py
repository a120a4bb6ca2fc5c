"""The ControlNeXt pipelines behave like the stock diffusers ones wherever control is not involved.

Checks in the style of diffusers' `PipelineTesterMixin` (tiny dummy components): `from_pipe` both ways, the full
call signature, positional arguments, the control image formats and batch rule of diffusers' ControlNet pipelines,
saving and loading (variants, `DiffusionPipeline.from_pretrained`), non-finite inputs, and bit-for-bit equality with
the stock pipeline when no module is attached (batching, callbacks, schedulers, dict/tuple outputs).
"""

from __future__ import annotations

import inspect
import json
import pydoc
import re
import typing
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
)
from diffusers.image_processor import VaeImageProcessor

from controlnext.conditioning import load_condition
from controlnext.pipelines import (
    MultiControlNeXtModel,
    StableDiffusionControlNeXtImg2ImgPipeline,
    StableDiffusionControlNeXtInpaintPipeline,
    StableDiffusionControlNeXtPipeline,
    StableDiffusionXLControlNeXtImg2ImgPipeline,
    StableDiffusionXLControlNeXtInpaintPipeline,
    StableDiffusionXLControlNeXtPipeline,
)
from controlnext.pipelines.svd import StableVideoDiffusionControlNeXtPipeline
from controlnext.testing import tiny_controlnext, tiny_pipeline_components, tiny_svd_components

# (family, task) -> (ours, stock)
PAIRS = {
    ("sd15", "txt2img"): (StableDiffusionControlNeXtPipeline, StableDiffusionPipeline),
    ("sd15", "img2img"): (StableDiffusionControlNeXtImg2ImgPipeline, StableDiffusionImg2ImgPipeline),
    ("sd15", "inpaint"): (StableDiffusionControlNeXtInpaintPipeline, StableDiffusionInpaintPipeline),
    ("sdxl", "txt2img"): (StableDiffusionXLControlNeXtPipeline, StableDiffusionXLPipeline),
    ("sdxl", "img2img"): (StableDiffusionXLControlNeXtImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline),
    ("sdxl", "inpaint"): (StableDiffusionXLControlNeXtInpaintPipeline, StableDiffusionXLInpaintPipeline),
}
VARIANT = {"sd15": "sd15-training", "sdxl": "sdxl"}
CONTROL_ARGS = ("control_image", "controlnext_conditioning_scale", "control_guidance_start", "control_guidance_end")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {fam: tiny_pipeline_components(fam, root / fam) for fam in ("sd15", "sdxl")}


def build(cls, components, family, **extra):
    pipe = cls(**components[family], **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(task: str, seed: int = 0, **kw) -> dict:
    """The arguments of one stock call (diffusers' `get_dummy_inputs`), with a fresh generator."""
    out = dict(prompt="a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
    out["output_type"] = "np"
    if task != "txt2img":
        out["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
        out["strength"] = 0.75
    if task == "inpaint":
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:48, 16:48] = 1.0
        out["mask_image"] = mask
    out.update(kw)
    return out


def as_json(config) -> dict:
    """A config as it reads back from config.json (tuples become lists), without the private keys."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def images(out) -> np.ndarray:
    return out[0] if isinstance(out, tuple) else out.images


# ---------------------------------------------------------------------- no module: the stock pipeline, bit for bit
@pytest.mark.parametrize("family,task", sorted(PAIRS))
def test_without_a_module_every_output_equals_the_stock_pipeline(components, family, task):
    ours_cls, stock_cls = PAIRS[(family, task)]
    stock, ours = build(stock_cls, components, family), build(ours_cls, components, family)
    cases = [
        {},
        {"prompt": ["a red star", "a blue circle"], "num_images_per_prompt": 2},  # batching
        {"guidance_scale": 1.0},  # no classifier-free guidance
        {"return_dict": False},  # tuple output
    ]
    for case in cases:
        a, b = images(stock(**inputs(task, **case))), images(ours(**inputs(task, **case)))
        assert a.shape == b.shape and np.array_equal(a, b), case
    # dict and tuple outputs hold the same images (diffusers' test_dict_tuple_outputs_equivalent)
    assert np.array_equal(ours(**inputs(task)).images, ours(**inputs(task, return_dict=False))[0])
    for scheduler_cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        stock.scheduler = scheduler_cls.from_config(components[family]["scheduler"].config)
        ours.scheduler = scheduler_cls.from_config(components[family]["scheduler"].config)
        assert np.array_equal(stock(**inputs(task)).images, ours(**inputs(task)).images), scheduler_cls.__name__


@pytest.mark.parametrize("family,task", [("sd15", "txt2img"), ("sdxl", "inpaint")])
def test_callbacks_see_and_change_the_same_tensors_as_in_the_stock_pipeline(components, family, task):
    ours_cls, stock_cls = PAIRS[(family, task)]
    stock = build(stock_cls, components, family)
    ours = build(ours_cls, components, family, controlnext=tiny_controlnext(VARIANT[family]))
    asked = ["latents", "prompt_embeds"]

    def run(pipe, **control):
        seen = []

        def callback(p, i, t, tensors):  # diffusers' test_callback_inputs: exactly the asked tensors, changeable
            seen.append(sorted(tensors))
            return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

        out = pipe(**inputs(task), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=asked, **control)
        return out.images, seen

    ref, ref_seen = run(stock)
    assert ref_seen
    # the control path wraps the callback (to advance the control schedule); at scale 0 it must change nothing
    for control in ({}, {"control_image": torch.rand(3, 64, 64), "controlnext_conditioning_scale": 0.0}):
        got, got_seen = run(ours, **control) if control else run(build(ours_cls, components, family))
        assert got_seen == ref_seen == [sorted(asked)] * len(ref_seen) and np.array_equal(got, ref)
    with_control, _ = run(ours, control_image=torch.rand(3, 64, 64))
    assert np.abs(with_control - ref).max() > 1e-4


def test_every_scale_zero_needs_no_control_image(components):
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=tiny_controlnext("sd15-training"))
    with pytest.raises(ValueError, match="controlnext_conditioning_scale=0") as err:
        pipe(**inputs("txt2img"))
    assert "control_image is required" in str(err.value)
    # what the message suggests works, and is the stock pipeline
    stock = build(StableDiffusionPipeline, components, "sd15")
    got = pipe(**inputs("txt2img"), controlnext_conditioning_scale=0).images
    assert np.array_equal(got, stock(**inputs("txt2img")).images)


# ---------------------------------------------------------------------- signatures
@pytest.mark.parametrize("family,task", sorted(PAIRS))
def test_call_signature_is_the_stock_one_plus_the_control_arguments(family, task):
    ours_cls, stock_cls = PAIRS[(family, task)]
    stock = inspect.signature(stock_cls.__call__).parameters
    ours = inspect.signature(ours_cls.__call__).parameters
    assert [n for n in ours if n not in CONTROL_ARGS] == list(stock)
    for name, param in stock.items():
        assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name
    for name in CONTROL_ARGS:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
    text = pydoc.render_doc(ours_cls.__call__, renderer=pydoc.plaintext)  # what help() prints
    signature = text[text.index("__call__(") : text.index(")\n")]
    for name in ("num_images_per_prompt", "callback_on_step_end", "guidance_scale", *CONTROL_ARGS):
        assert re.search(rf"\b{name}\b[:=]", signature), name
    assert "controlnext_conditioning_scale:" in text and "num_images_per_prompt (" in text  # both docs are there


@pytest.mark.parametrize("family,task", sorted(PAIRS))
def test_init_type_hints_are_the_stock_ones_plus_controlnext(family, task):
    ours_cls, stock_cls = PAIRS[(family, task)]
    ours, stock = typing.get_type_hints(ours_cls.__init__), typing.get_type_hints(stock_cls.__init__)
    assert {k: v for k, v in ours.items() if k != "controlnext"} == stock
    types = ours_cls._get_signature_types()
    assert types["unet"] == stock_cls._get_signature_types()["unet"]
    assert set(types["controlnext"]) == {tiny_controlnext("sdxl").__class__, MultiControlNeXtModel, type(None)}


def test_positional_height_and_width(components):
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=tiny_controlnext("sd15-training"))
    cond = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    kw = dict(control_image=cond, num_inference_steps=2, output_type="np")
    positional = pipe("a red star", 32, 48, generator=torch.Generator().manual_seed(0), **kw).images
    named = pipe("a red star", height=32, width=48, generator=torch.Generator().manual_seed(0), **kw).images
    assert positional.shape == (1, 32, 48, 3) and np.array_equal(positional, named)
    with pytest.raises(TypeError, match="multiple values for argument 'height'"):  # a real duplicate still is one
        pipe("a red star", 32, height=32, **kw)


# ---------------------------------------------------------------------- from_pipe
@pytest.mark.parametrize("family,task", sorted(PAIRS))
def test_from_pipe_both_ways_shares_the_components(components, family, task):
    ours_cls, stock_cls = PAIRS[(family, task)]
    stock = build(stock_cls, components, family)
    module = tiny_controlnext(VARIANT[family])
    ours = ours_cls.from_pipe(stock, controlnext=module)
    assert type(ours) is ours_cls and ours.controlnext is module
    assert all(ours.components[k] is v for k, v in stock.components.items())
    back = stock_cls.from_pipe(ours)
    assert type(back) is stock_cls and "controlnext" not in back.components
    assert all(back.components[k] is v for k, v in stock.components.items())
    public = {k: v for k, v in stock.config.items() if not k.startswith("_")}  # test_from_pipe_consistent_config
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == public
    # between ControlNeXt pipelines the module comes along (text-to-image -> inpainting and back)
    other_cls = PAIRS[(family, "inpaint" if task != "inpaint" else "txt2img")][0]
    assert other_cls.from_pipe(ours).controlnext is module
    # without a module, a pipeline made by from_pipe is the stock pipeline
    plain = ours_cls.from_pipe(stock)
    plain.set_progress_bar_config(disable=True)
    stock.set_progress_bar_config(disable=True)
    assert plain.controlnext is None and np.array_equal(plain(**inputs(task)).images, stock(**inputs(task)).images)


def test_from_pipe_both_ways_for_video():
    stock = StableVideoDiffusionPipeline(**tiny_svd_components())
    module = tiny_controlnext("svd-v2")
    ours = StableVideoDiffusionControlNeXtPipeline.from_pipe(stock, controlnext=module)
    assert ours.controlnext is module and all(ours.components[k] is v for k, v in stock.components.items())
    back = StableVideoDiffusionPipeline.from_pipe(ours)
    assert type(back) is StableVideoDiffusionPipeline and back.unet is stock.unet


# ---------------------------------------------------------------------- control image formats and batches
def test_condition_formats_match_the_controlnet_image_processor():
    # The processor StableDiffusionControlNetPipeline uses for its control images (no normalisation to [-1, 1]).
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    f32 = u8.astype(np.float32) / 255.0
    pil = [PIL.Image.fromarray(a) for a in u8]
    pt = torch.from_numpy(f32).permute(0, 3, 1, 2)
    cases = {
        "PIL": pil[0],
        "list of PIL": pil,
        "array (H, W, C)": f32[0],
        "array (B, H, W, C)": f32,
        "list of arrays (H, W, C)": list(f32),
        "list of arrays (1, H, W, C)": [a[None] for a in f32],
        "tensor (C, H, W)": pt[0],
        "tensor (B, C, H, W)": pt,
        "list of tensors (C, H, W)": list(pt),
        "list of tensors (1, C, H, W)": [t[None] for t in pt],
    }
    for name, image in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates lists of 4-D inputs
            expected = processor.preprocess(image)
        got = load_condition(image)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)
    assert load_condition(u8).shape == (2, 3, 16, 24)  # uint8 batches as well
    with pytest.raises(ValueError, match=r"expected \(H, W\) or \(H, W, C\)"):
        load_condition(torch.zeros(1, 1, 3, 8, 8))


def test_batched_control_images_follow_the_controlnet_batch_rule(components):
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=tiny_controlnext("sd15-training"))
    u8 = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    two = ["a red star", "a blue circle"]

    def run(control_image, prompt=two, **kw):
        return pipe(**inputs("txt2img", prompt=prompt, control_image=control_image, **kw)).images

    ref = run([PIL.Image.fromarray(a) for a in u8], num_images_per_prompt=2)
    assert ref.shape == (4, 64, 64, 3)
    for same in (u8, [torch.from_numpy(a).permute(2, 0, 1)[None] / 255.0 for a in u8]):
        assert np.array_equal(run(same, num_images_per_prompt=2), ref)
    # Which batch sizes are accepted is ControlNet's rule: one image, or one per prompt.
    image = PIL.Image.fromarray(u8[0])
    for prompts in (1, 2, 3):
        for rows in (1, 2, 3):
            try:
                StableDiffusionControlNetPipeline.check_image(None, [image] * rows, ["p"] * prompts, None)
                accepted = True
            except ValueError:
                accepted = False
            if accepted:
                assert run([image] * rows, prompt=["p"] * prompts, num_inference_steps=1).shape[0] == prompts
            else:
                with pytest.raises(ValueError, match="cannot be spread"):
                    run([image] * rows, prompt=["p"] * prompts, num_inference_steps=1)


# ---------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30, -1.0])
def test_out_of_range_scales_and_guidance_are_refused(components, bad):
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=tiny_controlnext("sd15-training"))
    cond = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match=r"controlnext_conditioning_scale must be a finite number in \[0.0, 10.0\]"):
        pipe(**inputs("txt2img", control_image=cond, controlnext_conditioning_scale=bad))
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite number in \[0.0, 100.0\]"):
        pipe(**inputs("txt2img", control_image=cond, guidance_scale=bad))


def test_non_finite_conditions_are_refused(components):
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=tiny_controlnext("sd15-training"))
    cond = torch.rand(3, 64, 64)
    cond[0, 3, 3] = float("nan")
    for bad in (cond, cond.permute(1, 2, 0).numpy(), [cond[None]]):
        with pytest.raises(ValueError, match="finite"):
            pipe(**inputs("txt2img", control_image=bad))


def test_video_pipeline_refuses_non_finite_scales():
    pipe = StableVideoDiffusionControlNeXtPipeline(**tiny_svd_components(), controlnext=tiny_controlnext("svd-v2"))
    ref = PIL.Image.new("RGB", (64, 64))
    video = [PIL.Image.new("RGB", (64, 64))] * 2
    for kw, name in (
        ({"controlnext_conditioning_scale": float("nan")}, "controlnext_conditioning_scale"),
        ({"control_level": float("inf")}, "control_level"),
        ({"max_guidance_scale": float("nan")}, "max_guidance_scale"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            pipe(ref, control_video=video, num_inference_steps=1, **kw)


# ---------------------------------------------------------------------- saving and loading
def test_multi_module_saves_and_loads_with_every_argument(components, tmp_path):
    mods = [tiny_controlnext("sd15-training", seed=1), tiny_controlnext("sd15-training", seed=2)]
    multi = MultiControlNeXtModel(mods)
    multi.save_pretrained(tmp_path / "m", safe_serialization=False, variant="fp16")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.bin"]
    loaded = MultiControlNeXtModel.from_pretrained(tmp_path / "m", variant="fp16", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16 and len(loaded.nets) == 2
    for a, b in zip(mods, loaded.nets):
        assert as_json(b.config) == as_json(a.config)
        for k, v in a.state_dict().items():
            assert torch.equal(v.half(), b.state_dict()[k]), k
    # In a pipeline folder diffusers hands variant and safe_serialization on to the component.
    pipe = build(StableDiffusionControlNeXtPipeline, components, "sd15", controlnext=mods)
    cond = [torch.rand(3, 64, 64)] * 2
    before = pipe(**inputs("txt2img", control_image=cond)).images
    pipe.save_pretrained(tmp_path / "p", variant="fp16", safe_serialization=False)
    assert (tmp_path / "p" / "controlnext" / "diffusion_pytorch_model.fp16.bin").is_file()
    again = StableDiffusionControlNeXtPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.controlnext, MultiControlNeXtModel)
    assert np.array_equal(again(**inputs("txt2img", control_image=cond)).images, before)
    # Folders of the earlier layout (module_0, module_1, ...) still load, with the arguments given.
    for i, m in enumerate(mods):
        m.save_pretrained(tmp_path / "old" / f"module_{i}")
    old = MultiControlNeXtModel.from_pretrained(tmp_path / "old", torch_dtype=torch.float16)
    assert old.dtype == torch.float16 and torch.equal(old.nets[1].state_dict()["mid_convs.1.weight"],
                                                      mods[1].state_dict()["mid_convs.1.weight"].half())  # fmt: skip


@pytest.mark.parametrize("family,task", [("sd15", "txt2img"), ("sdxl", "img2img")])
def test_a_saved_pipeline_loads_through_diffusion_pipeline(components, tmp_path, monkeypatch, family, task):
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    cls = PAIRS[(family, task)][0]
    pipe = build(cls, components, family, controlnext=tiny_controlnext(VARIANT[family]))
    cond = torch.rand(3, 64, 64)
    before = pipe(**inputs(task, control_image=cond)).images
    pipe.save_pretrained(tmp_path / "p")
    index = tmp_path / "p" / "model_index.json"
    assert json.loads(index.read_text())["_class_name"] == ["controlnext_pipeline", cls.__name__]
    # the class reads its own name there (diffusers' hub download reads model_index.json the same way)
    assert cls._dict_from_json_file(index)["_class_name"] == cls.__name__
    assert f"import {cls.__name__}" in (tmp_path / "p" / "controlnext_pipeline.py").read_text()
    # diffusers runs the folder's code only when asked to; its error names the file, and the file the class
    with pytest.raises(ValueError, match="controlnext_pipeline.py.*\n.*trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "p")
    for loaded in (
        DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True),
        cls.from_pretrained(tmp_path / "p"),  # the class itself needs no remote code
    ):
        assert type(loaded) is cls
        loaded.set_progress_bar_config(disable=True)
        assert np.array_equal(loaded(**inputs(task, control_image=cond)).images, before)


def test_save_load_without_a_module(components, tmp_path):
    # diffusers' test_save_load_optional_components: an optional component saved as None loads as None.
    pipe = build(StableDiffusionXLControlNeXtPipeline, components, "sdxl")
    before = pipe(**inputs("txt2img")).images
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["controlnext"] == [None, None]
    again = StableDiffusionXLControlNeXtPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    assert again.controlnext is None and np.array_equal(again(**inputs("txt2img")).images, before)
