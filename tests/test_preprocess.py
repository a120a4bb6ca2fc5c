"""Preprocessors on images drawn here (known edges and shapes), their errors, and `controlnext preprocess`."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnext import preprocess as pp
from controlnext.cli import main
from controlnext.preprocess.pose import BODY_COLORS, BODY_LIMBS, HAND_EDGES, PoseKeypoints


def square(size=64, lo=16, hi=48, colour=(255, 255, 255), background=(0, 0, 0)) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = background
    img[lo:hi, lo:hi] = colour
    return img


def white(pil: Image.Image) -> np.ndarray:
    arr = np.asarray(pil)
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8
    return arr[..., 0] > 127


# ---------------------------------------------------------------------- canny
def test_canny_square_edges_lie_on_its_border():
    edges = white(pp.canny(square(), 100, 200))
    ys, xs = np.nonzero(edges)
    assert edges.sum() > 100
    # Every edge pixel is within one pixel of the square's boundary (rows/cols 15..16 and 47..48).
    on_border = (np.minimum(abs(ys - 15.5), abs(ys - 47.5)) <= 1) | (np.minimum(abs(xs - 15.5), abs(xs - 47.5)) <= 1)
    assert on_border.all()
    inside = (ys > 18) & (ys < 45) & (xs > 18) & (xs < 45)
    assert not inside.any()
    # Output is three identical channels, values 0 or 255 only.
    arr = np.asarray(pp.canny(square()))
    assert set(np.unique(arr)) <= {0, 255} and (arr[..., 0] == arr[..., 2]).all()


def test_canny_thresholds_control_weak_edges():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 40  # a weak step: gradient magnitude ~ 4 * 40 = 160 with the 3x3 Sobel
    assert white(pp.canny(img, 50, 100)).any()
    assert not white(pp.canny(img, 300, 400)).any()


def test_canny_sees_colour_edges_of_equal_brightness_per_channel():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = (200, 0, 0)
    img[:, 32:] = (0, 0, 200)
    for per_channel in (False, True):
        cols = np.nonzero(white(pp.canny(img, 100, 200, per_channel=per_channel)).any(0))[0]
        assert set(cols) <= {31, 32} and len(cols) >= 1


def test_canny_matches_opencv_reference():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (48, 48), dtype=np.uint8), (5, 5), 0)
    ref = cv2.Canny(img, 60, 120)
    got = np.asarray(pp.canny(np.repeat(img[..., None], 3, axis=2), 60, 120, per_channel=True))[..., 0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("low,high", [(200, 100), (-1, 100), (10, 5000)])
def test_canny_bad_thresholds(low, high):
    with pytest.raises(ValueError, match="threshold"):
        pp.canny(square(), low, high)


# ---------------------------------------------------------------------- mask and scribble
def test_mask_from_brightness_and_invert():
    m = white(pp.mask(square()))
    assert m[16:48, 16:48].all() and m.sum() == 32 * 32
    inv = white(pp.mask(square(), invert=True))
    np.testing.assert_array_equal(inv, ~m)


def test_mask_from_alpha_channel():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 255  # colour is uniform: only the alpha says where the object is
    rgba[10:30, 5:20, 3] = 255
    m = white(pp.mask(Image.fromarray(rgba, "RGBA")))
    assert m.sum() == 20 * 15 and m[10:30, 5:20].all()
    with pytest.raises(ValueError, match="alpha"):
        pp.mask(square(), source="alpha")


def test_scribble_dark_ink_on_white_page_is_flipped_and_thickened():
    page = np.full((64, 64, 3), 255, np.uint8)
    page[32, 8:56] = 0  # a 1 px horizontal pen line
    thin = white(pp.scribble(page, thickness=1))
    assert thin.sum() == 48 and thin[32, 8:56].all()
    thick = white(pp.scribble(page, thickness=5))
    column = thick[:, 32]
    assert column[30:35].all() and column.sum() == 5  # grown by 2 px each side
    with pytest.raises(ValueError, match="thickness"):
        pp.scribble(page, thickness=0)
    with pytest.raises(ValueError, match="mode"):
        pp.scribble(page, mode="dream")


def test_scribble_from_photo_follows_the_shape():
    s = white(pp.scribble(square(colour=(200, 60, 60)), mode="photo", thickness=3))
    assert s.any()
    ys, xs = np.nonzero(s)
    assert ys.min() >= 12 and ys.max() <= 51 and xs.min() >= 12 and xs.max() <= 51
    assert not s[24:40, 24:40].any()  # the flat inside has no strokes


# ---------------------------------------------------------------------- segmentation
def three_stripes(noise: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((48, 96, 3), np.float64)
    img[:, :32] = (200, 30, 30)
    img[:, 32:64] = (30, 200, 30)
    img[:, 64:] = (30, 30, 200)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def test_segment_photo_gives_one_flat_colour_per_region():
    seg = np.asarray(pp.segment(three_stripes(), segments=3))
    colours = [np.unique(seg[:, i * 32 + 2 : (i + 1) * 32 - 2].reshape(-1, 3), axis=0) for i in range(3)]
    assert all(len(c) == 1 for c in colours)
    assert len({tuple(c[0]) for c in colours}) == 3
    assert {tuple(c[0]) for c in colours} <= {tuple(c) for c in pp.palette(3)}


def test_segment_map_keeps_the_maps_own_colours():
    seg = np.asarray(pp.segment(three_stripes(noise=4), segments=3, source="map"))
    for i, ref in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        got = np.unique(seg[:, i * 32 + 2 : (i + 1) * 32 - 2].reshape(-1, 3), axis=0)
        assert len(got) == 1 and np.abs(got[0].astype(int) - ref).max() <= 3


def test_segment_bad_values():
    with pytest.raises(ValueError, match="segments"):
        pp.segment(three_stripes(), segments=0)
    with pytest.raises(ValueError, match="source"):
        pp.segment(three_stripes(), source="x")


def test_palette_is_distinct_and_deterministic():
    p = pp.palette(32)
    assert len(np.unique(p, axis=0)) == 32
    np.testing.assert_array_equal(p, pp.palette(32))


# ---------------------------------------------------------------------- pose
def standing_person(w=128, h=128) -> PoseKeypoints:
    body = np.zeros((18, 3))
    pts = {0: (64, 20), 1: (64, 36), 2: (50, 36), 3: (46, 56), 4: (44, 74), 5: (78, 36), 6: (82, 56), 7: (84, 74),
           8: (56, 76), 9: (56, 98), 10: (56, 120), 11: (72, 76), 12: (72, 98), 13: (72, 120),
           14: (60, 17), 15: (68, 17), 16: (56, 19), 17: (72, 19)}  # fmt: skip
    for i, (x, y) in pts.items():
        body[i] = (x, y, 0.9)
    return PoseKeypoints(body=body[None], width=w, height=h)


def test_draw_pose_colours_joints_and_limbs():
    kp = standing_person()
    img = np.asarray(pp.draw_pose(kp))
    # Joint dots carry their own colour (drawn after the limbs).
    for i in (0, 4, 10, 13):
        x, y = kp.body[0, i, :2].astype(int)
        np.testing.assert_array_equal(img[y, x], BODY_COLORS[i])
    # The middle of each limb carries 60 % of the limb colour.
    for (a, b), colour in zip(BODY_LIMBS[:12], BODY_COLORS):
        mid = ((kp.body[0, a, :2] + kp.body[0, b, :2]) / 2).round().astype(int)
        np.testing.assert_allclose(img[mid[1], mid[0]], [int(c * 0.6) for c in colour], atol=1)
    # Background stays black far from the person.
    assert (img[:10, :30] == 0).all()


def test_draw_pose_skips_low_scores_and_scales_to_canvas():
    kp = standing_person()
    kp.body[0, 4, 2] = 0.1  # right wrist unsure: neither its dot nor the forearm is drawn
    img = np.asarray(pp.draw_pose(kp, min_score=0.3))
    assert (img[72:77, 42:47] == 0).all()
    big = np.asarray(pp.draw_pose(kp, width=256, height=256))
    np.testing.assert_array_equal(big[40, 128], BODY_COLORS[0])  # nose at (64, 20) * 2


def test_draw_pose_hands_and_face():
    kp = standing_person()
    hands = np.zeros((1, 2, 21, 3))
    hands[0, 0, :, :2] = np.stack([np.linspace(20, 40, 21), np.full(21, 100.0)], axis=1)
    hands[0, 0, :, 2] = 1.0
    face = np.zeros((1, 68, 3))
    face[0, 0] = (100, 10, 1.0)
    kp = PoseKeypoints(body=kp.body, width=128, height=128, hands=hands, face=face)
    img = np.asarray(pp.draw_pose(kp))
    np.testing.assert_array_equal(img[100, 20], (0, 0, 255))  # hand joints are blue dots
    np.testing.assert_array_equal(img[10, 100], (255, 255, 255))  # face points are white
    assert len(HAND_EDGES) == 20
    no_extras = np.asarray(pp.draw_pose(kp, hands=False, face=False))
    assert (no_extras[98:103, 18:42] == 0).all() and (no_extras[8:13, 98:103] == 0).all()


def test_openpose_json_pixels_and_normalised(tmp_path):
    kp = standing_person()
    flat = kp.body[0].reshape(-1).tolist()
    (tmp_path / "px.json").write_text(
        json.dumps({"canvas_width": 128, "canvas_height": 128, "people": [{"pose_keypoints_2d": flat}]})
    )
    norm = kp.body[0].copy()
    norm[:, :2] /= 128
    (tmp_path / "norm.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": norm.reshape(-1).tolist()}]}))
    a = pp.load_openpose_json(tmp_path / "px.json")
    b = pp.load_openpose_json(tmp_path / "norm.json", width=128, height=128)
    np.testing.assert_allclose(a.body, kp.body)
    np.testing.assert_allclose(b.body, kp.body)
    np.testing.assert_array_equal(np.asarray(pp.pose(tmp_path / "px.json")), np.asarray(pp.draw_pose(kp)))
    with pytest.raises(ValueError, match="canvas"):
        pp.load_openpose_json(tmp_path / "norm.json")
    (tmp_path / "bad.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2]}]}))
    with pytest.raises(ValueError, match="18 x 3"):
        pp.load_openpose_json(tmp_path / "bad.json", 10, 10)


def test_pose_detection_names_missing_dwpose_files(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTROLNEXT_DWPOSE_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="yolox_l.onnx"):
        pp.pose(square())
    (tmp_path / "yolox_l.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"dw-ll_ucoco_384\.onnx") as err:
        pp.pose(square(), model_dir=tmp_path)
    assert "yolox_l.onnx," not in str(err.value).split("missing")[1].split(".")[0]


def test_detect_pose_converts_dwpose_output_to_pixels(tmp_path, monkeypatch):
    """The glue around the DWPose detector: normalised PoseFrame -> pixel keypoints at the image size."""
    import controlnext.pose as pose_pkg
    from controlnext.pose.types import WHOLEBODY_POINTS, PoseFrame

    for name in pp.DWPOSE_FILES:
        (tmp_path / name).write_bytes(b"")
    kp = np.full((1, WHOLEBODY_POINTS, 2), 0.25)
    kp[0, 0] = (0.5, 0.1)
    scores = np.ones((1, WHOLEBODY_POINTS))

    class FakeDetector:
        def __init__(self, det, pose):
            assert det.name == "yolox_l.onnx" and pose.name == "dw-ll_ucoco_384.onnx"

        def __call__(self, rgb):
            assert rgb.shape == (40, 80, 3)
            return PoseFrame.from_wholebody(kp, scores)

    monkeypatch.setattr(pose_pkg, "DWPoseDetector", FakeDetector)
    got = pp.detect_pose(np.zeros((40, 80, 3), np.uint8), tmp_path)
    assert (got.width, got.height) == (80, 40)
    np.testing.assert_allclose(got.body[0, 0], (40, 4, 1))
    np.testing.assert_allclose(got.hands[0, 1, 3], (20, 10, 1))


# ---------------------------------------------------------------------- depth
def test_depth_from_16bit_map_and_invert():
    ramp = np.tile(np.linspace(1000, 60000, 64).astype(np.uint16), (8, 1))
    out = np.asarray(pp.depth_from_map(Image.fromarray(ramp)))
    assert out.shape == (8, 64, 3) and out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()
    inv = np.asarray(pp.depth_from_map(Image.fromarray(ramp), invert=True))
    np.testing.assert_array_equal(inv, 255 - out)


def test_depth_needs_a_local_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="depth model folder"):
        pp.depth(square())
    with pytest.raises(FileNotFoundError, match="not found"):
        pp.depth(square(), tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json.*weights"):
        pp.depth(square(), tmp_path)
    with pytest.raises(FileNotFoundError, match="downloads are allowed"):
        pp.depth(square(), "Intel/dpt-hybrid-midas")


@pytest.fixture(scope="module")
def tiny_depth_dir(tmp_path_factory):
    """A tiny random DPT depth model saved as a local transformers folder."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    cfg = DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_dpt")
    DPTForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_pad=False).save_pretrained(path)
    return path


def test_depth_with_local_transformers_model_matches_direct_forward(tiny_depth_dir):
    import torch
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    img = square(size=48, colour=(250, 200, 30))
    out = np.asarray(pp.depth(img, tiny_depth_dir))
    assert out.shape == (48, 48, 3) and out.min() == 0 and out.max() == 255

    # Independent path: processor + model forward, bicubic resize to the input size, min-max to 0..255.
    model = DPTForDepthEstimation.from_pretrained(tiny_depth_dir).eval()
    inputs = AutoImageProcessor.from_pretrained(tiny_depth_dir)(images=Image.fromarray(img), return_tensors="pt")
    with torch.no_grad():
        pred = model(**inputs).predicted_depth[:, None]
        pred = torch.nn.functional.interpolate(pred, size=(48, 48), mode="bicubic", align_corners=False)[0, 0]
    pred = pred.double().numpy()
    ref = np.round((pred - pred.min()) / (pred.max() - pred.min()) * 255)
    assert np.abs(out[..., 0].astype(int) - ref).max() <= 1
    inv = np.asarray(pp.depth(img, tiny_depth_dir, invert=True))
    np.testing.assert_array_equal(inv, 255 - out)


# ---------------------------------------------------------------------- helpers and registry
def test_inputs_rgba_16bit_and_paths(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    assert pp.to_rgb_array(Image.fromarray(rgba, "RGBA"))[0, 0].tolist() == [128, 0, 0]  # composited on black
    Image.fromarray(square()).save(tmp_path / "sq.png")
    np.testing.assert_array_equal(pp.to_rgb_array(tmp_path / "sq.png"), square())
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read"):
        pp.to_rgb_array(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError):
        pp.to_rgb_array(tmp_path / "missing.png")


def test_fit_to_size_modes():
    img = Image.fromarray(np.zeros((50, 100, 3), np.uint8))
    for mode in ("crop", "pad", "stretch"):
        assert pp.fit_to_size(img, 64, 64, mode).size == (64, 64)
    with pytest.raises(ValueError, match="mode"):
        pp.fit_to_size(img, 64, 64, "zoom")


def test_registry_dispatch_and_unknown_name():
    np.testing.assert_array_equal(np.asarray(pp.preprocess("canny", square())), np.asarray(pp.canny(square())))
    np.testing.assert_array_equal(np.asarray(pp.preprocess("none", square())), square())
    with pytest.raises(ValueError, match="Unknown preprocessor"):
        pp.preprocess("sobel", square())


# ---------------------------------------------------------------------- CLI
def test_cli_preprocess_canny_writes_the_edges(tmp_path, capsys):
    Image.fromarray(square()).save(tmp_path / "in.png")
    assert main(["preprocess", "canny", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--low", "50"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(pp.canny(square(), 50)))
    assert "wrote" in capsys.readouterr().out


def test_cli_preprocess_other_kinds_and_resize(tmp_path):
    Image.fromarray(square()).save(tmp_path / "in.png")
    for kind, extra in (("mask", []), ("scribble", ["--mode", "photo"]), ("segment", ["--segments", "2"])):
        out = tmp_path / f"{kind}.png"
        assert main(["preprocess", kind, str(tmp_path / "in.png"), "-o", str(out), "--size", "32x48", *extra]) == 0
        assert Image.open(out).size == (32, 48)
    assert main(["preprocess", "depth", str(tmp_path / "in.png"), "-o", str(tmp_path / "d.png"), "--from-map"]) == 0


def test_cli_preprocess_errors_are_one_line(tmp_path, capsys):
    Image.fromarray(square()).save(tmp_path / "in.png")
    cases = [
        (["canny", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--low", "300"], "must not exceed"),
        (["canny", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png")], "not found"),
        (["canny", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.txt")], "Output must be an image"),
        (["pose", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png")], "yolox_l.onnx"),
        (["depth", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png")], "depth model"),
        (["mask", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--size", "big"], "--size"),
    ]
    for argv, message in cases:
        assert main(["preprocess", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------- the registry is the source of truth
def test_every_registry_option_is_a_cli_flag_and_the_cli_passes_it_through(tmp_path, monkeypatch):
    import argparse

    from controlnext.cli import build_parser
    from controlnext.preprocess.registry import REGISTRY

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["preprocess"]
    kinds = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, pre in REGISTRY.items():
        if name == "none":
            continue
        flags = {s for a in kinds[name]._actions for s in a.option_strings}
        assert {o.cli_flag for o in pre.options} <= flags, name
    seen = {}
    monkeypatch.setitem(REGISTRY, "segment", replace_fn(REGISTRY["segment"], seen))
    Image.fromarray(square()).save(tmp_path / "in.png")
    argv = ["preprocess", "segment", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--segments", "3"]
    assert main(argv) == 0
    assert seen == {"segments": 3, "smoothing": 7, "source": "photo", "seed": 0}  # checked, typed, defaults filled


def replace_fn(pre, seen):
    import dataclasses

    def fn(image, **options):
        seen.update(options)
        return pp.to_pil(image)

    return dataclasses.replace(pre, fn=fn)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("canny", {"low": float("nan")}, "finite"),
        ("canny", {"low": 1e30}, "must lie in"),
        ("segment", {"segments": 2.5}, "whole number"),
        ("segment", {"source": "video"}, "one of photo, map"),
        ("mask", {"threshold": "dark"}, "must be a number"),
        ("mask", {"colour": 3}, "has no option 'colour'"),
        ("pose", {"hands": "maybe"}, "true or false"),
    ],
)
def test_registry_rejects_bad_option_values(name, options, message):
    with pytest.raises(ValueError, match=message):
        pp.preprocess(name, square(), **options)


def test_old_pose_flag_still_works_with_a_note(tmp_path, capsys):
    Image.fromarray(square()).save(tmp_path / "in.png")
    argv = ["preprocess", "pose", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png")]
    assert main([*argv, "--pose-models", str(tmp_path)]) == 2  # no ONNX files there: the clear error
    err = capsys.readouterr().err
    assert "--pose-models is deprecated; use --dwpose-dir" in err and "yolox_l.onnx" in err


def test_segment_of_one_pixel_and_of_thin_images():
    for shape in ((1, 1, 3), (1, 5, 3), (5, 1, 3)):
        rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for source in ("photo", "map"):
            out = pp.segment(rgb, segments=8, smoothing=7, source=source)
            assert out.size == (shape[1], shape[0]), (shape, source)
    # one pixel is one region: the first palette colour for a photo, its own colour for a map
    one = np.array([[[10, 200, 30]]], np.uint8)
    assert np.asarray(pp.segment(one))[0, 0].tolist() == pp.palette(1)[0].tolist()
    assert np.asarray(pp.segment(one, source="map"))[0, 0].tolist() == [10, 200, 30]


def test_cli_segment_refuses_huge_sizes_and_non_images(tmp_path, capsys):
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "one.png")
    out = tmp_path / "o.png"
    assert main(["preprocess", "segment", str(tmp_path / "one.png"), "-o", str(out)]) == 0
    assert Image.open(out).size == (1, 1)
    (tmp_path / "weights.pt").write_text("hello world")
    cases = [
        (["segment", str(tmp_path / "one.png"), "-o", str(out), "--size", "30000x30000"], "between 1x1 and 4096x4096"),
        (["segment", str(tmp_path / "weights.pt"), "-o", str(out)], "Cannot read weights.pt as an image"),
    ]
    for argv, message in cases:
        assert main(["preprocess", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    Image.fromarray(square()).save(tmp_path / "in.png")

    def exhausted(*args, **kwargs):
        raise MemoryError

    import dataclasses

    from controlnext.preprocess.registry import REGISTRY

    monkeypatch.setitem(REGISTRY, "segment", dataclasses.replace(REGISTRY["segment"], fn=exhausted))
    assert main(["preprocess", "segment", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "Out of memory making the segment map of in.png; give a smaller --size" in err and "Traceback" not in err
