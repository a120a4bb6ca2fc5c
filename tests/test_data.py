"""The procedural shapes dataset: determinism, consistency of the derived conditions, the on-disk layout."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from controlnext.cli import main
from controlnext.shapes import COLOURS, SHAPES, VOCABULARY, canny_edges, render_sample, write_dataset


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_sample(7, 3), render_sample(7, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    others = [render_sample(8, 3).image, render_sample(7, 4).image]
    assert all(not np.array_equal(a.image, o) for o in others)


def test_sample_contents_are_consistent():
    for i in range(40):
        s = render_sample(0, i)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert set(np.unique(s.mask)) <= {0, 255} and set(np.unique(s.edges)) <= {0, 255}
        meta = s.meta
        assert meta["shape"] in SHAPES and meta["colour"] in COLOURS and meta["background"] in COLOURS
        assert meta["colour"] != meta["background"]
        assert s.caption == f"a {meta['colour']} {meta['shape']} on a {meta['background']} background"
        assert set(s.caption.split()) <= set(VOCABULARY)
        inside = s.mask > 0
        assert 20 < inside.sum() < 64 * 64 * 0.6
        # Pixels well inside the mask have the shape colour, well outside the background colour (up to jitter).
        fg = np.array(COLOURS[meta["colour"]], float)
        bg = np.array(COLOURS[meta["background"]], float)
        core = np.zeros_like(inside)
        core[1:-1, 1:-1] = (
            inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        )
        if core.any():
            assert np.abs(s.image[core].mean(0) - fg).max() < 20
        outside = ~inside
        assert np.abs(np.median(s.image[outside], axis=0) - bg).max() <= 13
        # Edges lie on the silhouette boundary: within 2 px of a mask transition (image border rows excluded,
        # where a shape touching the border has no transition to measure against).
        dist = np.maximum(
            cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5),
            cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, 5),
        )
        edges = s.edges[1:-1, 1:-1] > 0
        assert edges.any() and dist[1:-1, 1:-1][edges].max() <= 2


def test_all_kinds_occur():
    metas = [render_sample(0, i).meta for i in range(300)]
    assert {m["shape"] for m in metas} == set(SHAPES)
    assert {m["colour"] for m in metas} == set(COLOURS)
    assert {m["background"] for m in metas} == set(COLOURS)


def test_canny_sees_equal_luminance_edges():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (200, 0, 0)
    img[:, 16:] = (0, 0, 200)  # a red/blue boundary with equal channel maxima: grey Canny could miss it
    edges = canny_edges(img)
    assert edges[:, 14:18].any() and not edges[:, :12].any()
    with pytest.raises(ValueError, match="uint8"):
        canny_edges(img.astype(np.float32))


def test_write_dataset_imagefolder(tmp_path):
    out = write_dataset(tmp_path / "ds", 6, seed=3, condition="mask", progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"file_name", "conditioning_image_file_name", "text"} <= set(rows[0])
    assert json.loads((out / "dataset.json").read_text())["condition"] == "mask"
    from PIL import Image

    cond = np.asarray(Image.open(out / rows[2]["conditioning_image_file_name"]))
    assert np.array_equal(cond[..., 0], render_sample(3, 2).mask)
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert {"image", "conditioning_image", "text"} <= set(ds.column_names)
    assert ds[0]["text"] == rows[0]["text"] and ds[0]["conditioning_image"].size == (64, 64)


def test_make_dataset_cli(tmp_path, capsys):
    assert main(["make-dataset", str(tmp_path / "d"), "--n", "3", "--seed", "1", "--condition", "edges"]) == 0
    assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["make-dataset", str(tmp_path / "other"), "--n", "2"]) == 2
    assert "not a shapes dataset" in capsys.readouterr().err
    assert main(["make-dataset", str(tmp_path / "e"), "--n", "0"]) == 2


def test_describe_reads_ground_truth():
    from controlnext.shapes.analysis import describe

    hits = [0, 0, 0]
    n = 150
    for i in range(n):
        s = render_sample(77, i)
        colour, shape, background = describe(s.image)
        hits[0] += colour == s.meta["colour"]
        hits[1] += shape == s.meta["shape"]
        hits[2] += background == s.meta["background"]
    assert hits[0] == n and hits[2] == n and hits[1] >= 0.97 * n
