"""Sharded streaming data: shards written and read back, the split over processes and workers, exact positions,
and bad input (select with `pytest -k shards`)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext.training import shards as sh
from controlnext.training.data import open_source, scan_rows


def _write(source_dir, out, per_shard):
    source = open_source(str(source_dir))
    rows = scan_rows(source).good
    return sh.write_shards([lambda i=i: sh.sample_members(source.raw(i)) for i in rows], out, len(rows), per_shard,
                           progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory):
    """The 32-row shapes set as uneven shards: 7 per shard (7, 7, 7, 7, 4)."""
    out = tmp_path_factory.mktemp("shards")
    _write(shapes, out, 7)
    return out


def _stream(shards, rank=0, world=1, workers=0, batch=4, seed=3, buffer=6, **kw):
    settings = sh.StreamSettings(resolution=64, batch_size=batch, seed=seed, shuffle_buffer=buffer, center_crop=True,
                                 **kw)  # fmt: skip
    return sh.ShardStream(shards, settings, rank=rank, world=world, num_workers=workers)


def _epoch(stream, epoch, stop=None):
    stream.set_epoch(epoch)
    out = []
    for batch in stream:
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def test_shards_index_counts_and_contents(shapes, shard_dir):
    index = json.loads((shard_dir / sh.INDEX_FILE).read_text())
    assert [e["samples"] for e in index["shards"]] == [7, 7, 7, 7, 4] and index["samples"] == 32
    shards = sh.open_shards(str(shard_dir))
    assert shards.samples == 32 and not shards.problems
    # The same set named by a brace pattern and by a glob, and without the index (counted from the tar headers).
    assert sh.open_shards(str(shard_dir / "shard-{000000..000004}.tar")).samples == 32
    assert sh.open_shards(str(shard_dir / "*.tar")).samples == 32
    assert sh.is_shard_set(str(shard_dir)) and not sh.is_shard_set(str(shapes))
    assert [sh._count_tar(str(shard_dir / e["file"])) for e in index["shards"]] == [(7, None)] * 4 + [(4, None)]
    # Members are the source files' bytes, unchanged.
    with tarfile.open(shard_dir / "shard-000001.tar") as tar:
        names = tar.getnames()[:3]
        image = tar.extractfile("000000007.image.png").read()
    assert names == ["000000007.conditioning_image.png", "000000007.image.png", "000000007.txt"]
    assert image == (shapes / "images" / "0007.png").read_bytes()
    report = sh.check_shards(shards, progress=False)
    assert report["usable"] == 32 and report["bad_rows"] == [] and [s["samples"] for s in report["shards"]][-1] == 4


def test_shards_every_sample_once_across_2_processes_x_2_workers(shapes, shard_dir):
    shards = sh.open_shards(str(shard_dir))
    meta = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    orders = []
    for epoch in (0, 1):
        seen, batches = [], []
        for rank in (0, 1):
            out = _epoch(_stream(shards, rank, world=2, workers=2, batch=3), epoch)
            batches.append(len(out))
            for batch in out:
                assert 1 <= len(batch["row_ids"]) <= 3 and not batch["bad_rows"]
                for row_id, caption, pixels in zip(batch["row_ids"], batch["captions"], batch["pixel_values"]):
                    key = int(row_id.rsplit(":", 1)[1])  # the k-th row written is the k-th row of the source
                    seen.append(key)
                    # Compared with the source image read independently (64 px, centre crop: unchanged).
                    want = np.asarray(Image.open(shapes / meta[key]["file_name"]).convert("RGB"), np.float32)
                    torch.testing.assert_close(pixels, torch.from_numpy(want).permute(2, 0, 1) / 127.5 - 1.0)
                    assert caption == meta[key]["text"]
        assert sorted(seen) == list(range(32)), Counter(seen).most_common(3)
        # Same number of batches on both processes: 32 samples / (2 x 3) -> 6 each, the last ones smaller.
        assert batches == [6, 6]
        orders.append(seen)
    assert orders[0] != orders[1]  # shard order and buffer reshuffled per epoch


@pytest.mark.parametrize("total,world,batch", [(32, 2, 3), (9, 2, 4), (17, 2, 4), (5, 4, 2), (7, 3, 1), (64, 8, 8)])
def test_shards_plan_gives_every_process_the_same_batches(total, world, batch):
    counts = [total // 3, total - 2 * (total // 3), total // 3]
    union = []
    for rank in range(world):
        steps, plans = sh.epoch_plan(counts, 0, 2, rank, world, 2, batch)
        sizes = sorted((j, size) for p in plans for j, size in zip(p.batches, p.sizes))
        assert [j for j, _ in sizes] == list(range(steps)) and all(1 <= size <= batch for _, size in sizes)
        assert sum(p.samples for p in plans) == sum(size for _, size in sizes)
        offsets = np.cumsum([0, *counts])
        union += [int(offsets[s]) + i for p in plans for s, a, b in p.pieces for i in range(a, b)]
    kept = total - (total % world if batch == 1 else 0)  # batch size 1: the remainder waits for the next epoch
    assert len(union) == len(set(union)) == kept
    assert sh.buffer_order(50, 8, np.random.default_rng(0)).tolist() != list(range(50))
    assert sorted(sh.buffer_order(50, 8, np.random.default_rng(0))) == list(range(50))


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_position_restores_exactly_at_every_batch(shard_dir, workers):
    shards = sh.open_shards(str(shard_dir))
    full = [b["row_ids"] for b in _epoch(_stream(shards, 1, world=2, workers=workers), 5)]
    for cut in range(1, len(full)):
        first = _stream(shards, 1, world=2, workers=workers)
        head = [b["row_ids"] for b in _epoch(first, 5, stop=cut)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = _stream(shards, 1, world=2, workers=workers)
        resumed.load_state_dict(state)
        assert head + [b["row_ids"] for b in _epoch(resumed, 5)] == full
    moved = _stream(shards, 1, world=2, workers=workers)
    moved.load_state_dict(state)
    with pytest.raises(ValueError, match=r"position is in epoch 5 .* but training continues with epoch 6"):
        moved.set_epoch(6)
    with pytest.raises(ValueError, match=r"processes: 2 -> 4.*resume with the same number of processes"):
        _stream(shards, 1, world=4, workers=workers).load_state_dict(state)
    with pytest.raises(ValueError, match=r"workers: \d -> 3"):
        _stream(shards, 1, world=2, workers=3).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ bad input
def _png(value=128, size=64):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})


def _good(i):
    return f"s{i:04d}", {"image.png": _png(i), "conditioning_image.png": _png(255 - i), "txt": f"sample {i}".encode()}


def test_shards_bad_samples_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    broken = [
        ("nocond", {"image.png": _png(), "txt": b"no condition"}),
        ("corrupt", {"image.png": _png()[:40], "conditioning_image.png": _png(), "txt": b"cut-off png"}),
        ("garbage", {"image.png": b"not an image", "conditioning_image.png": _png(), "txt": b"garbage"}),
    ]
    _tar(folder / "a.tar", [_good(0), broken[0], _good(1), broken[1], _good(2)])
    _tar(folder / "b.tar", [_good(3), broken[2], _good(4), _good(5)])
    _tar(folder / "c.tar", [_good(i) for i in range(6, 12)])
    data = (folder / "c.tar").read_bytes()
    (folder / "c.tar").write_bytes(data[: len(data) // 2])  # a truncated shard
    shards = sh.open_shards(str(folder))
    assert [s.samples for s in shards.shards] == [5, 4, 3]  # the truncated one keeps its complete samples
    assert shards.problems[0][0] == "c.tar" and "truncated" in shards.problems[0][1]
    report = sh.check_shards(shards, progress=False)
    reasons = dict(report["bad_rows"])
    assert report["usable"] == 9 and len(reasons) == 3
    assert "no condition member" in reasons["a.tar:nocond"]
    assert "not a readable image" in reasons["a.tar:corrupt"] or "could not be decoded" in reasons["a.tar:corrupt"]
    assert "not a readable image" in reasons["b.tar:garbage"]
    # Read for training: every good sample once, the bad ones reported in their batches, batches filled up; a batch
    # left with no good sample repeats one (reported), so that both processes take the same number of steps.
    seen, bad = [], []
    for rank in (0, 1):
        for batch in _epoch(_stream(shards, rank, world=2, workers=2, batch=2, buffer=3), 0):
            seen += batch["row_ids"]
            bad += batch["bad_rows"]
    repeated = [rid for rid, why in bad if why.startswith("repeated once")]
    parts = (("a.tar", range(3)), ("b.tar", range(3, 6)), ("c.tar", range(6, 9)))
    good = [f"{name}:s{i:04d}" for name, keys in parts for i in keys]
    assert sorted(seen) == sorted(good + repeated)
    assert sorted(rid for rid, why in bad if rid not in repeated) == ["a.tar:corrupt", "a.tar:nocond", "b.tar:garbage"]
    with pytest.raises(ValueError, match="no condition member"):
        _epoch(_stream(shards, 0, batch=11, on_bad_row="error"), 0)


def test_shards_empty_or_unusable_sets_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .tar or .parquet shard files"):
        sh.open_shards(str(empty), streaming=True)
    with pytest.raises(FileNotFoundError, match="5 of the 5 shard files it names do not exist"):
        sh.open_shards(str(tmp_path / "x-{0..4}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        sh.open_shards(str(tmp_path / "nothing-*.tar"))
    _tar(empty / "zero.tar", [])
    (empty / "junk.tar").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"no usable sample in its 2 shard\(s\)"):
        sh.open_shards(str(empty))
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        _tar(empty / "one.tar", [_good(0)])
        _stream(sh.open_shards(str(empty)), world=4)


# ------------------------------------------------------------------------------------------------ the commands
def test_shards_make_and_check_commands(shapes, tmp_path, capsys):
    import shutil

    from controlnext.cli import main

    source = tmp_path / "source"
    shutil.copytree(shapes, source)
    (source / "images" / "0003.png").write_bytes(b"broken")  # a bad row: skipped and listed
    out = tmp_path / "shards"
    assert main(["make-shards", str(source), str(out), "--samples-per-shard", "10"]) == 0
    text = capsys.readouterr().out
    assert "wrote 31 samples in 4 shard(s)" in text and "1 bad row(s) skipped" in text and "0003.png" in text
    # Rows read ahead by 8 threads are written in order: the same bytes as one at a time.
    _write(source, tmp_path / "sequential", 10)
    for name in ("shard-000000.tar", "shard-000003.tar", sh.INDEX_FILE):
        assert (out / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()
    assert main(["check-shards", str(out), "--json", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "31 samples, 31 usable, 0 unusable" in text and "shard-000003.tar: 1 samples" in text
    assert json.loads((tmp_path / "report.json").read_text())["usable"] == 31
    assert main(["make-shards", str(source), str(out)]) == 2  # not over existing shards
    assert "already holds shards" in capsys.readouterr().err
    # A damaged sample inside a shard: check-shards names it and exits with 1.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / sh.INDEX_FILE).unlink()
    _tar(broken / "shard-000009.tar", [_good(0), ("bad", {"image.png": b"x", "conditioning_image.png": _png()})])
    assert main(["check-shards", str(broken)]) == 1
    text = capsys.readouterr().out
    assert "sample shard-000009.tar:bad: image is not a readable image" in text and "1 unusable" in text
    assert main(["check-shards", str(tmp_path / "none-{0..3}.tar")]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_shards_parquet_files_stream_with_row_groups_skipped(shapes, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]

    def image(name):  # the layout `datasets` writes for an Image column
        return {"bytes": (shapes / name).read_bytes(), "path": name}

    folder = tmp_path / "parquet"
    folder.mkdir()
    for part, rows in enumerate((meta[:20], meta[20:])):
        table = pa.table({
            "image": [image(r["file_name"]) for r in rows],
            "conditioning_image": [image(r["conditioning_image_file_name"]) for r in rows],
            "text": [r["text"] for r in rows],
        })  # fmt: skip
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=3)
    assert not sh.is_shard_set(str(folder)) and sh.is_shard_set(str(folder), streaming=True)
    shards = sh.open_shards(str(folder), streaming=True)
    assert [(s.kind, s.samples) for s in shards.shards] == [("parquet", 20), ("parquet", 12)]
    captions = []
    for rank in (0, 1):
        for batch in _epoch(_stream(shards, rank, world=2, workers=2, batch=3), 4):
            captions += batch["captions"]
            assert not batch["bad_rows"]
    assert Counter(captions) == Counter(r["text"] for r in meta)
    # A reader that starts inside a shard skips the row groups before it without reading them.
    first = next(sh.read_shard(shards.shards[0], shards.columns, start=10))
    assert first[0] == 10 and first[1].caption == meta[10]["text"]


def test_shards_hub_dataset_streams_its_data_files_through_fsspec(shapes, shard_dir, monkeypatch):
    """A hub dataset in streaming mode: its data files (hf:// URLs there; file:// URLs here, offline) are read
    through fsspec, not downloaded whole."""
    import datasets

    urls = [f"file://{p}" for p in sorted(shard_dir.glob("*.tar"))]

    class Builder:  # what load_dataset_builder resolves for a dataset stored as WebDataset tars
        config = type("Config", (), {"data_files": {"train": urls}})

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: Builder)
    assert sh.shard_files("someone/shapes", streaming=True) == urls
    shards = sh.open_shards("someone/shapes", streaming=True)
    assert shards.samples == 32 and shards.root is None
    seen = [rid for batch in _epoch(_stream(shards, batch=5), 0) for rid in batch["row_ids"]]
    assert sorted(int(r.rsplit(":", 1)[1]) for r in seen) == list(range(32))
    with pytest.raises(ValueError, match="no data files for split 'test'"):
        sh.open_shards("someone/shapes", streaming=True, split="test")
