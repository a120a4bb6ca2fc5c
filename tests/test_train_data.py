"""Training data: HF datasets conventions, column names, bad rows, identical augmentation, dropout, batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext.testing.data import write_shapes_dataset
from controlnext.training.data import (
    BadRowError,
    ColumnNames,
    ControlDataset,
    EpochBatchSampler,
    assign_buckets,
    bucket_sizes,
    collate,
    open_source,
    scan_rows,
)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """An asymmetric RGB pattern, so that any crop offset or flip changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], axis=-1)
    return np.clip(base + rng.integers(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _write_rows(root, rows):
    with open(root / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_imagefolder_jsonl_csv_saved_and_parquet_agree(tmp_path):
    import datasets

    write_shapes_dataset(tmp_path / "jsonl", n=6)
    write_shapes_dataset(tmp_path / "csv", n=6, fmt="csv")
    meta = [json.loads(line) for line in open(tmp_path / "jsonl" / "metadata.jsonl")]
    root = tmp_path / "jsonl"
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(root / m["file_name"]) for m in meta],
            "conditioning_image": [str(root / m["conditioning_image_file_name"]) for m in meta],
            "text": [m["text"] for m in meta],
        }
    ).cast_column("image", datasets.Image())
    ds = ds.cast_column("conditioning_image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))

    samples = {}
    for name in ("jsonl", "csv", "saved", "pq"):
        source = open_source(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert len(source) == 6
        scan = scan_rows(source)
        assert scan.good == list(range(6)) and not scan.bad
        data = ControlDataset(source, scan, 64, center_crop=True)
        samples[name] = data[(0, 3)]
    ref = samples["jsonl"]
    assert ref["caption"] == meta[3]["text"]
    for name, s in samples.items():
        assert s["caption"] == ref["caption"], name
        assert torch.equal(s["pixel_values"], ref["pixel_values"]), name
        assert torch.equal(s["conditioning"], ref["conditioning"]), name
    # Values: image in [-1, 1], condition (a white-on-black mask) in [0, 1] and binary.
    assert ref["pixel_values"].min() >= -1 and ref["pixel_values"].max() <= 1
    assert set(torch.unique(ref["conditioning"]).tolist()) <= {0.0, 1.0}


def test_custom_column_names_and_missing_column_errors(tmp_path):
    _save(tmp_path / "a.png", _pattern(16, 16, 0))
    _save(tmp_path / "b.png", _pattern(16, 16, 1))
    _write_rows(tmp_path, [{"source_file_name": "a.png", "hint_file_name": "b.png", "prompt": "x"}])
    source = open_source(str(tmp_path), ColumnNames("source", "hint", "prompt"))
    raw = source.raw(0)
    assert raw.image == tmp_path / "a.png" and raw.condition == tmp_path / "b.png" and raw.caption == "x"

    with pytest.raises(ValueError, match=r"no condition column 'conditioning_image'.*--condition-column"):
        open_source(str(tmp_path), ColumnNames("source", "conditioning_image", "prompt"))
    with pytest.raises(
        ValueError, match=r"no caption column 'text'.*\['hint_file_name', 'prompt', 'source_file_name'\]"
    ):
        open_source(str(tmp_path), ColumnNames("source", "hint", "text"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl/metadata.csv"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nope"))


def _bad_dataset(root):
    for i in range(4):
        _save(root / f"img{i}.png", _pattern(32, 32, i))
        _save(root / f"cond{i}.png", _pattern(32, 32, 10 + i))
    _save(root / "small.png", _pattern(16, 32, 5))
    (root / "text.png").write_text("not an image")
    rows = [
        {"file_name": "img0.png", "conditioning_image_file_name": "cond0.png", "text": "ok 0"},
        {"file_name": "missing.png", "conditioning_image_file_name": "cond1.png", "text": "missing"},
        {"file_name": "img1.png", "conditioning_image_file_name": "text.png", "text": "unreadable"},
        {"file_name": "img2.png", "conditioning_image_file_name": "small.png", "text": "size"},
        '{"file_name": "img3.png", "conditioning_image_file_name": ',
        {"file_name": "img3.png", "conditioning_image_file_name": "cond3.png", "text": 5},
        {"file_name": "img1.png", "conditioning_image_file_name": "cond1.png", "text": ["ok a", "ok b"]},
    ]
    _write_rows(root, rows)


def test_bad_rows_are_reported_by_row_id_and_skipped_or_fatal(tmp_path):
    _bad_dataset(tmp_path)
    source = open_source(str(tmp_path))
    scan = scan_rows(source, on_bad_row="skip")
    assert scan.good == [0, 6]
    reasons = dict(scan.bad)
    assert "file not found" in reasons["1 [missing.png]"]
    assert "condition is not a readable image" in reasons["2 [img1.png]"]
    assert "image is 32x32 but condition is 32x16" in reasons["3 [img2.png]"]
    assert "not valid JSON" in reasons["4"]
    assert "caption must be text" in reasons["5 [img3.png]"]
    summary = scan.summary()
    assert summary.startswith("5 bad row(s) skipped, 2 used") and "row 1 [missing.png]" in summary

    with pytest.raises(BadRowError, match=r"bad dataset row 1 \[missing.png\]: image file not found"):
        scan_rows(source, on_bad_row="error")


def test_no_usable_rows_is_an_error(tmp_path):
    _write_rows(tmp_path, [{"file_name": "a.png", "conditioning_image_file_name": "b.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"No usable rows.*row 0 \[a.png\]: image file not found"):
        scan_rows(open_source(str(tmp_path)))


def test_row_failing_only_at_decode_is_replaced_and_reported(tmp_path):
    for i in range(3):
        _save(tmp_path / f"img{i}.png", _pattern(16, 16, i))
        _save(tmp_path / f"cond{i}.png", _pattern(16, 16, 10 + i))
    data = (tmp_path / "img1.png").read_bytes()
    (tmp_path / "img1.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    _write_rows(
        tmp_path,
        [
            {"file_name": f"img{i}.png", "conditioning_image_file_name": f"cond{i}.png", "text": f"t{i}"}
            for i in range(3)
        ],
    )
    source = open_source(str(tmp_path))
    scan = scan_rows(source)
    assert scan.good == [0, 1, 2]  # the header check cannot see it
    data = ControlDataset(source, scan, 16, center_crop=True)
    batch = collate([data[(0, 0)], data[(0, 1)]])
    assert batch["captions"] == ["t0", "t2"]  # row 1 replaced by the next good row of its bucket
    assert batch["bad_rows"][0][0] == "1 [img1.png]" and "could not be decoded" in batch["bad_rows"][0][1]
    strict = ControlDataset(source, scan, 16, center_crop=True, on_bad_row="error")
    with pytest.raises(BadRowError, match=r"row 1 \[img1.png\]"):
        strict[(0, 1)]


def test_crop_and_flip_are_identical_for_image_and_condition(tmp_path):
    rows = []
    for i in range(6):
        pattern = _pattern(40, 56, i)
        _save(tmp_path / f"img{i}.png", pattern)
        _save(tmp_path / f"cond{i}.png", pattern)  # the condition is the same picture
        rows.append({"file_name": f"img{i}.png", "conditioning_image_file_name": f"cond{i}.png", "text": "t"})
    _write_rows(tmp_path, rows)
    source = open_source(str(tmp_path))
    data = ControlDataset(source, scan_rows(source), 32, random_flip=True, seed=3)
    crops, flips = set(), 0
    for epoch in range(4):
        for pos in range(6):
            s = data[(epoch, pos)]
            image01 = (s["pixel_values"] + 1) / 2
            assert torch.allclose(image01, s["conditioning"], atol=1e-6)
            crops.add(tuple(s["time_ids"][2:4].tolist()))
            # Flipped iff the left column of the output equals the right column of the resized crop region.
            h0, w0, top, left, th, tw = s["time_ids"].tolist()
            assert (h0, w0, th, tw) == (40, 56, 32, 32)
            resized = np.asarray(
                Image.open(tmp_path / f"img{pos}.png").resize((45, 32), Image.Resampling.BILINEAR), np.float32
            )
            window = resized[int(top) : int(top) + 32, int(left) : int(left) + 32]
            out = np.asarray(s["pixel_values"].permute(1, 2, 0) * 127.5 + 127.5)
            flipped = not np.allclose(out, window, atol=1.0)
            if flipped:
                assert np.allclose(out, window[:, ::-1], atol=1.0)
            flips += flipped
    assert len(crops) > 3 and 0 < flips < 24  # augmentation really varies
    # Pure function of (seed, epoch, row): the same key gives the same sample.
    assert torch.equal(data[(2, 4)]["pixel_values"], data[(2, 4)]["pixel_values"])


def test_caption_dropout_rate_and_list_captions(tmp_path):
    write_shapes_dataset(tmp_path, n=40)
    source = open_source(str(tmp_path))
    scan = scan_rows(source)
    data = ControlDataset(source, scan, 64, caption_dropout=0.3, seed=1)
    empty = [data[(e, p)]["caption"] == "" for e in range(5) for p in range(40)]
    assert 0.2 < np.mean(empty) < 0.4
    none = ControlDataset(source, scan, 64, caption_dropout=0.0)
    assert all(none[(0, p)]["caption"] for p in range(40))


def test_batch_order_is_a_function_of_seed_and_epoch():
    sampler = EpochBatchSampler([list(range(10))], batch_size=3, seed=7)
    assert len(sampler) == 4
    e0, e0b, e1 = sampler.batches(0), sampler.batches(0), sampler.batches(1)
    assert e0 == e0b and e0 != e1
    assert sorted(i for b in e0 for i in b) == list(range(10))
    sampler.set_epoch(1)
    assert [[p for _, p in b] for b in sampler] == e1 and all(ep == 1 for b in sampler for ep, _ in b)
    assert EpochBatchSampler([list(range(10))], 3, seed=8).batches(0) != e0
    assert len(EpochBatchSampler([list(range(10))], 3, seed=7, drop_last=True)) == 3


def test_bucketing_groups_batches_by_aspect_ratio(tmp_path):
    rows = []
    for i, (h, w) in enumerate([(64, 64), (64, 128), (128, 64), (64, 64), (64, 128), (128, 64)]):
        _save(tmp_path / f"img{i}.png", _pattern(h, w, i))
        _save(tmp_path / f"cond{i}.png", _pattern(h, w, i + 9))
        rows.append({"file_name": f"img{i}.png", "conditioning_image_file_name": f"cond{i}.png", "text": "t"})
    _write_rows(tmp_path, rows)
    buckets = bucket_sizes(64, step=16)
    assert (64, 64) in buckets and all(w * h <= 64 * 64 for w, h in buckets)
    assert assign_buckets([(128, 64)], buckets) != assign_buckets([(64, 128)], buckets)
    source = open_source(str(tmp_path))
    data = ControlDataset(source, scan_rows(source), 64, buckets=buckets, seed=0)
    sampler = EpochBatchSampler(data.groups, batch_size=2, seed=0)
    shapes = set()
    for batch_keys in sampler:
        batch = collate([data[k] for k in batch_keys])
        assert batch["pixel_values"].shape[0] == 2
        shapes.add(tuple(batch["pixel_values"].shape[-2:]))
        assert batch["conditioning"].shape == batch["pixel_values"].shape
    assert len(shapes) == 3  # square, landscape and portrait buckets


def test_16bit_and_transparent_conditions_decode(tmp_path):
    _save(tmp_path / "img.png", _pattern(8, 8, 0))
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "depth.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent -> black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    _write_rows(
        tmp_path,
        [
            {"file_name": "img.png", "conditioning_image_file_name": "depth.png", "text": "a"},
            {"file_name": "img.png", "conditioning_image_file_name": "alpha.png", "text": "b"},
        ],
    )
    source = open_source(str(tmp_path))
    data = ControlDataset(source, scan_rows(source), 8, center_crop=True)
    assert torch.allclose(data[(0, 0)]["conditioning"], torch.ones(3, 8, 8))
    assert torch.equal(data[(0, 1)]["conditioning"], torch.zeros(3, 8, 8))


def test_decompression_bombs_are_skipped_in_either_column(tmp_path, monkeypatch):
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError); a low limit
    # makes 64x64 images such bombs while the 32x32 ones stay fine.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    rows = []
    for i, (img, cond) in enumerate([(32, 32), (64, 32), (32, 64), (32, 32)]):
        _save(tmp_path / f"img{i}.png", _pattern(img, img, i))
        _save(tmp_path / f"cond{i}.png", _pattern(cond, cond, 10 + i))
        rows.append({"file_name": f"img{i}.png", "conditioning_image_file_name": f"cond{i}.png", "text": f"t{i}"})
    _write_rows(tmp_path, rows)
    source = open_source(str(tmp_path))
    scan = scan_rows(source)
    assert scan.good == [0, 3]
    reasons = dict(scan.bad)
    assert "image is too large to decode safely" in reasons["1 [img1.png]"]
    assert "condition is too large to decode safely" in reasons["2 [img2.png]"]
    # Unchecked (--no-check-data): found when loaded, replaced by the next row and reported, in both columns.
    data = ControlDataset(source, scan_rows(source, check=False), 32, center_crop=True)
    batch = collate([data[(0, p)] for p in range(4)])
    assert batch["captions"] == ["t0", "t3", "t3", "t3"]
    found = dict(batch["bad_rows"])
    assert "image is too large" in found["1 [img1.png]"] and "condition is too large" in found["2 [img2.png]"]
