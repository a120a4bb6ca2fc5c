"""`controlnext generate` beyond one module and text-to-image: img2img, inpainting, several modules, inline
preprocessing, batches, and the SD3 / Flux families. Each result is compared with the library's pipelines called
directly (the reference), on tiny models."""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from controlnext.cli import main
from controlnext.loading import save_controlnext_file
from controlnext.testing.models import tiny_controlnext


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    blocks = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    for name, arr in {
        "photo": cv2.GaussianBlur(blocks, (5, 5), 0),
        "cond": (rng.random((64, 64, 3)) > 0.8).astype(np.uint8) * 255,
        "cond2": np.repeat(((np.arange(64)[:, None] + np.arange(64)) % 16 < 8)[..., None], 3, 2).astype(np.uint8) * 255,
        "mask": np.pad(np.full((32, 32), 255, np.uint8), 16),
    }.items():
        paths[name] = tmp_path / f"{name}.png"
        PIL.Image.fromarray(arr).save(paths[name])
    return paths


@pytest.fixture()
def modules(tmp_path):
    return [save_controlnext_file(tiny_controlnext("sd15-training", seed=s), tmp_path / f"m{s}.safetensors")
            for s in (1, 2)]  # fmt: skip


def _cli(tmp_path, model, mods, conds, *flags, name="out.png") -> np.ndarray:
    argv = ["generate", "--model", str(model), "--prompt", "a red square", "--steps", "2", "-o", str(tmp_path / name)]
    for m in mods:
        argv += ["--controlnext", str(m)]
    for c in conds:
        argv += ["--control-image", str(c)]
    assert main([*argv, *flags]) == 0
    return np.asarray(PIL.Image.open(tmp_path / name))


def _reference(cls, model, mods, **kwargs) -> np.ndarray:
    from controlnext.families import detect_family

    pipe = cls.from_pretrained(str(model), **detect_family(str(model)).pipeline_kwargs)
    for m in mods:
        pipe.load_controlnext(str(m))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    return np.asarray(image)


def _pil(path, mode="RGB"):
    return PIL.Image.open(path).convert(mode)


def test_img2img(tiny_sd15_dir, tmp_path, images, modules):
    from controlnext.pipelines import StableDiffusionControlNeXtImg2ImgPipeline as Img2Img

    got = _cli(tmp_path, tiny_sd15_dir, modules[:1], [images["cond"]], "--image", str(images["photo"]),
               "--strength", "0.5")  # fmt: skip
    ref = _reference(Img2Img, tiny_sd15_dir, modules[:1], image=_pil(images["photo"]), strength=0.5,
                     control_image=_pil(images["cond"]))  # fmt: skip
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, _cli(tmp_path, tiny_sd15_dir, modules[:1], [images["cond"]], name="t2i.png"))


def test_inpaint(tiny_sd15_dir, tmp_path, images, modules):
    from controlnext.pipelines import StableDiffusionControlNeXtInpaintPipeline as Inpaint

    got = _cli(tmp_path, tiny_sd15_dir, modules[:1], [images["cond"]], "--image", str(images["photo"]), "--mask",
               str(images["mask"]))  # fmt: skip
    ref = _reference(Inpaint, tiny_sd15_dir, modules[:1], image=_pil(images["photo"]), strength=0.8, height=64,
                     width=64, mask_image=_pil(images["mask"], "L"), control_image=_pil(images["cond"]))  # fmt: skip
    np.testing.assert_array_equal(got, ref)


def test_several_modules_each_with_its_condition_and_scale(tiny_sd15_dir, tmp_path, images, modules):
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline as Text2Img

    got = _cli(tmp_path, tiny_sd15_dir, modules, [images["cond"], images["cond2"]], "--control-scale", "1.0",
               "--control-scale", "0.5")  # fmt: skip
    ref = _reference(Text2Img, tiny_sd15_dir, modules, control_image=[_pil(images["cond"]), _pil(images["cond2"])],
                     controlnext_conditioning_scale=[1.0, 0.5])  # fmt: skip
    np.testing.assert_array_equal(got, ref)


def test_several_modules_need_one_image_each_or_one_for_all(tiny_sd15_dir, tmp_path, images, modules, capsys):
    argv = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "--controlnext", str(modules[0]),
            "--control-image", str(images["cond"]), "--control-image", str(images["cond2"])]  # fmt: skip
    assert main(argv) == 2
    assert "give one --control-image for all modules or one per --controlnext (1), got 2" in capsys.readouterr().err


def test_preprocess_canny_inline_equals_a_canny_condition(tiny_sd15_dir, tmp_path, images, modules):
    photo = np.asarray(_pil(images["photo"]))
    edges = np.zeros(photo.shape[:2], np.uint8)
    for c in range(3):  # the canny defaults: 50/150 on each channel
        edges |= cv2.Canny(np.ascontiguousarray(photo[..., c]), 50.0, 150.0)
    PIL.Image.fromarray(np.repeat(edges[..., None], 3, 2)).save(tmp_path / "edges.png")
    got = _cli(tmp_path, tiny_sd15_dir, modules[:1], [images["photo"]], "--preprocess", "canny")
    ref = _cli(tmp_path, tiny_sd15_dir, modules[:1], [tmp_path / "edges.png"], name="ref.png")
    np.testing.assert_array_equal(got, ref)


def test_num_images_writes_numbered_pngs_with_their_index(tiny_sd15_dir, tmp_path, images, modules):
    from controlnext.web.generation import read_settings

    argv = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "--steps", "1", "--controlnext",
            str(modules[0]), "--control-image", str(images["cond"]), "--num-images", "3"]  # fmt: skip
    argv += ["-o", str(tmp_path / "b.png")]
    assert main(argv) == 0
    outs = [tmp_path / f"b_{i}.png" for i in range(3)]
    assert [(read_settings(p)["index"], read_settings(p)["seed"]) for p in outs] == [(0, 0), (1, 1), (2, 2)]
    assert not np.array_equal(np.asarray(PIL.Image.open(outs[0])), np.asarray(PIL.Image.open(outs[1])))
    # each image is remade on its own from its PNG (its own seed, one image), as the web app's are
    assert main(["generate", "--from-png", str(outs[2]), "-o", str(tmp_path / "again.png")]) == 0
    again = np.asarray(PIL.Image.open(tmp_path / "again.png"))
    np.testing.assert_array_equal(again, np.asarray(PIL.Image.open(outs[2])))


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from controlnext.testing.models import tiny_dit_pipeline_components

    root = tmp_path_factory.mktemp("dit-cli")
    dirs = {}
    for family, cls in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        cls(**tiny_dit_pipeline_components(family, root / f"{family}-src")).save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_runs_the_transformer_families(dit_dirs, tmp_path, images, family):
    from controlnext.pipelines import FluxControlNeXtPipeline, StableDiffusion3ControlNeXtPipeline

    cls = {"sd3": StableDiffusion3ControlNeXtPipeline, "flux": FluxControlNeXtPipeline}[family]
    module = save_controlnext_file(tiny_controlnext(family), tmp_path / f"{family}.safetensors")
    got = _cli(tmp_path, dit_dirs[family], [module], [images["cond"]], "--guidance", "3")
    ref = _reference(cls, dit_dirs[family], [module], control_image=_pil(images["cond"]), guidance_scale=3.0,
                     height=64, width=64)  # fmt: skip
    assert got.shape == (64, 64, 3)
    np.testing.assert_array_equal(got, ref)
