"""Sharded, streaming training data: WebDataset tar shards and parquet shards, with exact mid-epoch resume.

A *shard set* is a folder of ``.tar`` files (optionally with the ``shards.json`` index that ``controlnext
make-shards`` writes), a brace or glob pattern (``data/train-{000000..000099}.tar``), ``.tar``/``.parquet`` files,
or, with ``--streaming``, a folder of parquet files or a hub dataset (its data files, read through ``fsspec``).
Tar members are read with ``webdataset`` (its tar iterator and key grouping: ``KEY.image.png``,
``KEY.conditioning_image.png``, ``KEY.txt``), parquet with ``pyarrow``; nothing is scanned row by row up front:
the sample counts come from the index, the parquet footers or the tar headers.

Which process and worker reads what, and in which order, is a pure function of (shard counts, seed, epoch,
processes, workers, batch size, shuffle buffer) -- see :func:`epoch_plan`:

* the shard order is shuffled per epoch; the concatenated samples are cut into one contiguous range per process
  (counts differ by at most one, so uneven shards never unbalance the processes), and each process's range into
  one contiguous range per data-loader worker: at most one shard is shared between two readers;
* every process takes the same number of batches per epoch, ``ceil(samples / (processes x batch))``: batches are
  full except at the end of the epoch, where some are smaller (never empty), so no sample is repeated or left out
  (with batch size 1, the ``samples % processes`` samples that would need an extra step are left out that epoch);
* each worker shuffles its range with a seeded buffer of ``shuffle_buffer`` samples; the buffer's choices are
  computed on sample positions alone, so its state at any point can be recomputed.

Exact resume: each batch carries (worker, batch number, samples taken so far by that worker); the stream records
this for the batches the training loop actually received (not what workers prefetched), and
:meth:`ShardStream.state_dict` holds it. A resumed stream recomputes each worker's buffer order, re-reads the shards
from the oldest sample still in its buffer (skipping, without decoding, what was already used) and continues: it
yields exactly the batches an uninterrupted run would have.

A sample that cannot be used (missing member, undecodable image, truncated shard) is skipped, reported in the
batch's ``bad_rows``, and the batch is filled from the next samples.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import METADATA_FILES, BadRowError, ColumnNames, RawRow, ScanReport, collate, load_sample

__all__ = [
    "INDEX_FILE",
    "open_stream",
    "STATE_FILE",
    "Shard",
    "ShardSet",
    "ShardStream",
    "buffer_order",
    "epoch_plan",
    "is_shard_set",
    "open_shards",
    "read_shard",
]

INDEX_FILE = "shards.json"
INDEX_FORMAT = "controlnext-shards"
STATE_FILE = "data_state.rank{rank}.json"  # one per process, inside each checkpoint folder
_STATE_FORMAT = "controlnext-stream-state"
_SHARD_ORDER, _BUFFER = 0x5A4D, 0xB0FF  # seed-sequence tags of the two random choices
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # WebDataset's usual image member names, if no column matches


# ------------------------------------------------------------------------------------------------ shard sets
@dataclass(frozen=True)
class Shard:
    """One shard file: its path or URL, its sample count and kind (``tar`` or ``parquet``)."""

    url: str
    samples: int
    kind: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class ShardSet:
    """The shards of a set, what was wrong with any of them, and (for a cache) the cache record of its index."""

    description: str
    shards: list[Shard]
    columns: ColumnNames = ColumnNames()
    problems: list[tuple[str, str]] = field(default_factory=list)
    cache: dict | None = None
    root: str | None = None

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def fingerprint(self) -> str:
        """SHA-256 of the shard names and counts (what decides the sample order)."""
        text = json.dumps([[s.name, s.samples] for s in self.shards])
        return hashlib.sha256(text.encode()).hexdigest()

    def scan_report(self) -> ScanReport:
        """The training loop's view: every sample usable (bad ones are found while reading), problems found."""
        return ScanReport(good=range(self.samples), sizes=[], bad=list(self.problems), checked=False)  # type: ignore[arg-type]


def _is_url(spec: str) -> bool:
    return "://" in spec


def _kind(name: str) -> str | None:
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def shard_files(spec: str, streaming: bool = False, split: str = "train", config_name: str | None = None,
                cache_dir: str | None = None) -> list[str] | None:  # fmt: skip
    """The shard files ``spec`` names, or None when it is not a shard set (it is then read map-style).

    Tar files are always streamed; parquet files and hub datasets only with ``streaming``.
    """
    if "{" in spec:
        from braceexpand import braceexpand

        files = list(braceexpand(spec))
        missing = [f for f in files if not _is_url(f) and not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--dataset {spec}: {len(missing)} of the {len(files)} shard files it names do not exist (first: "
                f"{missing[0]})."
            )
        return _only_shards(spec, files)
    if any(c in spec for c in "*?[") and not _is_url(spec):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise FileNotFoundError(f"--dataset {spec}: the pattern matches no file.")
        return _only_shards(spec, files)
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.rglob("*") if _kind(p.name) == "tar")
        if tars:
            return tars
        if not streaming:
            return None
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if not parquet:
            raise FileNotFoundError(f"--streaming: {path} holds no .tar or .parquet shard files.")
        return parquet
    if path.is_file():
        kind = _kind(path.name)
        if kind == "tar" or (kind == "parquet" and streaming):
            return [str(path)]
        if streaming:
            raise ValueError(f"--streaming reads .tar or .parquet shards; {path} is neither.")
        return None
    if _is_url(spec):
        return _only_shards(spec, [spec])
    if not streaming:
        return None
    return _hub_files(spec, split, config_name, cache_dir)


def _only_shards(spec: str, files: list[str]) -> list[str]:
    others = [f for f in files if _kind(f) is None]
    if others:
        raise ValueError(f"--dataset {spec}: {others[0]} is not a .tar or .parquet shard.")
    return files


def _hub_files(spec: str, split: str, config_name: str | None, cache_dir: str | None) -> list[str]:
    """The data files of a hub dataset (hf:// URLs, read through fsspec without downloading the whole set)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(spec, config_name, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown id, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"--streaming: hub dataset {spec!r} could not be opened: {reason}.") from err
    data_files = builder.config.data_files or {}
    files = [str(f) for f in data_files.get(split, [])]
    if not files:
        raise ValueError(f"--streaming: hub dataset {spec!r} has no data files for split {split!r} "
                         f"(splits: {sorted(data_files)}).")  # fmt: skip
    unusable = [f for f in files if _kind(f) is None]
    if unusable:
        raise ValueError(
            f"--streaming: hub dataset {spec!r} is stored as {unusable[0].rsplit('.', 1)[-1]} files; only parquet "
            "and WebDataset .tar data files can be streamed (convert it with `controlnext make-shards`)."
        )
    return files


def is_shard_set(spec: str, streaming: bool = False) -> bool:
    """True when ``--dataset spec`` is streamed as shards: with ``streaming``, or for ``.tar`` files, folders holding
    them and patterns (see :func:`shard_files`)."""
    path = Path(spec)
    if streaming or "{" in spec or _kind(spec) == "tar" or (any(c in spec for c in "*?[") and not path.exists()):
        return True
    if not path.is_dir() or (path / "dataset_info.json").is_file() or any((path / m).is_file() for m in METADATA_FILES):
        return False  # an imagefolder or saved dataset: not walked (it may hold millions of images)
    if (path / INDEX_FILE).is_file():
        return True
    return any(_kind(p.name) == "tar" for d in (path, *(c for c in path.iterdir() if c.is_dir())) for p in d.iterdir())


def _open_binary(url: str):
    if _is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _read_index(files: list[str]) -> tuple[dict, dict[str, dict]]:
    """The ``shards.json`` beside the shards (if all are in one local folder): (index, entry per file name)."""
    folders = {str(Path(f).parent) for f in files if not _is_url(f)}
    if len(folders) != 1 or any(_is_url(f) for f in files):
        return {}, {}
    path = Path(folders.pop()) / INDEX_FILE
    if not path.is_file():
        return {}, {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with `controlnext make-shards`.") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a {INDEX_FORMAT} index.")
    return index, {e["file"]: e for e in index.get("shards", [])}


def _count_tar(url: str) -> tuple[int, str | None]:
    """Samples (consecutive member groups of one key, as webdataset groups them) and a problem, from the headers."""
    from webdataset.tariterators import base_plus_ext, meta_prefix

    count, last, size = 0, None, None
    if not _is_url(url):
        size = Path(url).stat().st_size
    try:
        with _open_binary(url) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for info in tar:
                if size is not None and info.offset_data + info.size > size:
                    count -= base_plus_ext(info.name)[0] == last  # that sample is incomplete
                    return count, f"truncated: member {info.name} ends at byte {info.offset_data + info.size} of a " \
                                  f"{size}-byte file; its {count} complete samples are used"  # fmt: skip
                if not info.isreg() or info.name.startswith(meta_prefix):
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is not None and prefix != last:
                    count, last = count + 1, prefix
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        return count, f"unreadable after {count} samples ({err})"
    if size is not None and size - end < 1024:  # a tar ends with two zero blocks; without them it was cut off
        count = max(0, count - 1)  # its last sample may have lost members: left out
        return count, f"truncated: no end-of-archive marker; its first {count} samples are used"
    return count, None


def _count_parquet(url: str) -> tuple[int, str | None]:
    import pyarrow.parquet as pq

    try:
        with _open_binary(url) as f:
            return pq.ParquetFile(f).metadata.num_rows, None
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        return 0, f"unreadable parquet file ({err})"


def open_shards(spec: str, columns: ColumnNames = ColumnNames(), streaming: bool = False, split: str = "train",
                config_name: str | None = None, cache_dir: str | None = None) -> ShardSet:  # fmt: skip
    """Resolve and count a shard set. Counts come from ``shards.json`` where its recorded file size still matches,
    else from the tar headers or parquet footers. A shard that cannot be read is reported and left out; a set with
    no usable sample is an error (before training starts)."""
    files = shard_files(spec, streaming, split, config_name, cache_dir)
    if files is None:
        raise ValueError(f"--dataset {spec} is not a shard set (a folder of .tar files, a pattern, or parquet files "
                         "with --streaming).")  # fmt: skip
    if not files:
        raise FileNotFoundError(f"--dataset {spec}: the shard list is empty.")
    index, entries = _read_index(files)

    def count(url: str) -> tuple[int, str | None]:
        entry = entries.get(Path(url).name)
        if entry is not None and Path(url).stat().st_size == entry.get("bytes"):
            return int(entry["samples"]), None
        n, problem = (_count_tar if _kind(url) == "tar" else _count_parquet)(url)
        if entry is not None and problem is None:
            problem = f"changed since {INDEX_FILE} was written (size {Path(url).stat().st_size}, recorded " \
                      f"{entry.get('bytes')}); recounted: {n} samples"  # fmt: skip
        return n, problem

    with ThreadPoolExecutor(max_workers=8) as pool:
        counted = list(pool.map(count, files))
    shards, problems = [], []
    for url, (n, problem) in zip(files, counted):
        if problem is not None:
            problems.append((Path(url).name, problem))
        if n > 0:
            shards.append(Shard(url, n, _kind(url) or "tar"))
    if not shards:
        first = "; ".join(f"{name}: {why}" for name, why in problems[:3]) or "every shard is empty"
        raise ValueError(f"--dataset {spec}: no usable sample in its {len(files)} shard(s) ({first}).")
    root = str(Path(files[0]).parent) if not _is_url(files[0]) else None
    # make-shards writes the standard member names and records them; other tar sets are read with ``columns``
    cols = ColumnNames(**index["columns"]) if isinstance(index.get("columns"), dict) else columns
    return ShardSet(spec, shards, cols, problems, index.get("cache"), root)


# ------------------------------------------------------------------------------------------------ reading
def _member(sample: dict, column: str, fallbacks: tuple[str, ...] = ()) -> str | None:
    """The member suffix holding ``column``: ``column`` itself or ``column.<ext>``, else the first fallback."""
    for key in sample:
        if key == column or key.startswith(column + "."):
            return key
    return next((f for f in fallbacks if f in sample), None)


def tar_raw(sample: dict, columns: ColumnNames, row_id: str) -> RawRow:
    """A webdataset sample (member suffix -> bytes) as a :class:`RawRow`; missing members raise BadRowError."""
    found = {}
    for what, column, fallbacks in (("image", columns.image, IMAGE_SUFFIXES), ("condition", columns.condition, ())):
        key = _member(sample, column, fallbacks)
        if key is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise BadRowError(row_id, f"no {what} member ({column}.*) in the shard; its members are {members}")
        found[what] = sample[key]
    key = _member(sample, columns.caption, ("txt", "json"))
    caption: Any = None
    if key is not None:
        text = sample[key].decode("utf-8", errors="replace")
        if key.endswith("json"):
            try:
                caption = json.loads(text)
            except json.JSONDecodeError as err:
                raise BadRowError(row_id, f"caption member {key} is not valid JSON ({err})") from None
        else:
            caption = text
    return RawRow(row_id, found["image"], found["condition"], caption)


def _tar_samples(shard: Shard, errors: list[str]) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def stop(exn: Exception) -> bool:
        errors.append(str(exn.args[0]) if exn.args else type(exn).__name__)
        return False

    try:
        with _open_binary(shard.url) as f:
            files = tar_file_expander([{"url": shard.url, "stream": f}], handler=stop)
            yield from group_by_keys(files, handler=stop)
    except (tarfile.TarError, OSError, EOFError) as err:
        errors.append(str(err))


def _parquet_rows(shard: Shard, columns: ColumnNames, start: int, errors: list[str]) -> Iterator[dict | None]:
    """Rows of a parquet shard from ``start`` (whole row groups before it are not read); None for skipped rows."""
    import pyarrow.parquet as pq

    try:
        with _open_binary(shard.url) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            wanted = [c for c in (columns.image, columns.condition, columns.caption) if c in names]
            first, skipped = 0, 0
            while first < pf.num_row_groups and skipped + pf.metadata.row_group(first).num_rows <= start:
                skipped += pf.metadata.row_group(first).num_rows
                first += 1
            yield from (None for _ in range(skipped))
            for batch in pf.iter_batches(batch_size=256, row_groups=range(first, pf.num_row_groups), columns=wanted):
                yield from batch.to_pylist()
    except Exception as err:  # pyarrow's errors for damaged data are not OSErrors
        errors.append(str(err))


def _parquet_raw(row: dict, columns: ColumnNames, row_id: str, root: Path | None) -> RawRow:
    def resolve(value: Any) -> Any:
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
        if root is not None and isinstance(path, str) and not Path(path).is_absolute():
            return root / path
        return value

    for what, column in (("image", columns.image), ("condition", columns.condition)):
        if row.get(column) is None:
            raise BadRowError(row_id, f"no {what} (column {column!r} is missing or empty)")
    return RawRow(row_id, resolve(row[columns.image]), resolve(row[columns.condition]), row.get(columns.caption))


def read_shard(shard: Shard, columns: ColumnNames, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, RawRow | BadRowError]]:  # fmt: skip
    """``(index in shard, raw row or the reason it is unusable)`` for samples ``start`` to ``stop`` of a shard.

    Exactly ``stop - start`` items come out whatever the file holds: samples that a truncated or damaged shard no
    longer has are BadRowErrors, so the positions of every later sample stay the same.
    """
    stop = shard.samples if stop is None else stop
    errors: list[str] = []
    local = Path(shard.url).parent if not _is_url(shard.url) else None
    if shard.kind == "tar":
        items: Iterator[Any] = _tar_samples(shard, errors)
    else:
        items = _parquet_rows(shard, columns, start, errors)
    i = 0
    for item in items:
        if i >= stop:
            break
        if i >= start:  # earlier samples are read (tar streams) but not decoded
            row_id = f"{shard.name}:{item.get('__key__', i) if shard.kind == 'tar' else i}"
            try:
                raw = tar_raw(item, columns, row_id) if shard.kind == "tar" else _parquet_raw(item, columns, row_id,
                                                                                            local)  # fmt: skip
                yield i, raw
            except BadRowError as err:
                yield i, err
        i += 1
    reason = f"the shard ended after {i} of {shard.samples} samples" + (f" ({errors[0]})" if errors else "")
    for j in range(max(i, start), stop):
        yield j, BadRowError(f"{shard.name}:{j}", reason)


# ------------------------------------------------------------------------------------------------ the plan
def rank_batches(total: int, world: int, batch_size: int) -> tuple[list[int], int]:
    """(samples of each process, batches per process) for one epoch of ``total`` samples.

    Every process gets ``total // world`` or one more sample and the same number of batches: full ones first, the
    last ones smaller but never empty. With batch size 1 the ``total % world`` extra samples are left out.
    """
    if batch_size == 1:
        return [total // world] * world, total // world
    counts = [total // world + (r < total % world) for r in range(world)]
    return counts, math.ceil(total / (world * batch_size))


def batch_sizes(samples: int, steps: int, batch_size: int) -> list[int]:
    """Sizes of ``steps`` batches holding ``samples`` (full first, none empty)."""
    sizes, extra = [1] * steps, samples - steps
    for j in range(steps):
        add = min(batch_size - 1, extra)
        sizes[j] += add
        extra -= add
    return sizes


@dataclass(frozen=True)
class WorkerPlan:
    """What one data-loader worker of one process reads in one epoch."""

    pieces: list[tuple[int, int, int]]  # (shard number, first, stop) in read order
    batches: list[int]  # the process's batch numbers this worker produces, in order
    sizes: list[int]  # their sizes

    @property
    def samples(self) -> int:
        return sum(stop - first for _, first, stop in self.pieces)


def epoch_plan(counts: list[int], seed: int, epoch: int, rank: int, world: int, workers: int, batch_size: int
               ) -> tuple[int, list[WorkerPlan]]:  # fmt: skip
    """(batches of this process, one :class:`WorkerPlan` per worker) for ``epoch``; a pure function of its arguments.

    Batch ``j`` of a process comes from worker ``j % workers`` (the order in which a DataLoader takes them).
    """
    per_rank, steps = rank_batches(sum(counts), world, batch_size)
    sizes = batch_sizes(per_rank[rank], steps, batch_size)
    order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(counts))
    start = sum(per_rank[:rank])
    plans = []
    for k in range(workers):
        mine = list(range(k, steps, workers))
        n = sum(sizes[j] for j in mine)
        plans.append(WorkerPlan(_pieces(counts, order, start, start + n), mine, [sizes[j] for j in mine]))
        start += n
    return steps, plans


def _pieces(counts: list[int], order: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The (shard, first, stop) pieces of positions [lo, hi) of the shards concatenated in ``order``."""
    out, pos = [], 0
    for s in order:
        n = counts[s]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((int(s), a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return out


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` emits ``n`` samples read in order 0..n-1.

    The buffer is filled to ``size``, then each emission takes a uniformly chosen element and the next sample is
    read: the ``e``-th emission is among the first ``e + size`` samples read. Computed on positions only.
    """
    out = np.empty(n, dtype=np.int64)
    if size <= 1:
        out[:] = np.arange(n)
        return out
    draws = rng.random(n)
    buf: list[int] = list(range(min(size, n)))
    nxt = len(buf)
    for e in range(n):
        j = int(draws[e] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out[e] = buf.pop()
        if nxt < n:
            buf.append(nxt)
            nxt += 1
    return out


# ------------------------------------------------------------------------------------------------ the stream
@dataclass
class StreamSettings:
    """How samples are decoded and batched (the same on every process)."""

    resolution: int
    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1000
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    on_bad_row: str = "skip"


class _ShardDataset(torch.utils.data.IterableDataset):
    """Yields this process's batches of one epoch; each worker produces the batches its plan gives it."""

    def __init__(
        self,
        shards: ShardSet,
        settings: StreamSettings,
        rank: int,
        world: int,
        workers: int,
        sample_fn: Callable[..., dict] | None = None,
        collate_fn: Callable[[list[dict]], dict] = collate,
    ):
        self.shards = shards
        self.settings = settings
        self.rank, self.world, self.workers = rank, world, workers
        self.counts = [s.samples for s in shards.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()
        self.sample_fn = sample_fn
        self.collate_fn = collate_fn
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (samples taken, batches produced)
        self.rotation = 0

    def plan(self, epoch: int) -> tuple[int, list[WorkerPlan]]:
        s = self.settings
        return epoch_plan(self.counts, s.seed, epoch, self.rank, self.world, self.workers, s.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        # A DataLoader takes batches from its workers in turn, starting with worker 0; when resuming after batch c,
        # loader worker i plays plan worker (c + i) % workers, so that batch c comes first.
        yield from self._worker(((0 if info is None else info.id) + self.rotation) % self.workers)

    def _decode(self, raw: RawRow, index: int) -> dict:
        s = self.settings
        if self.sample_fn is not None:
            return self.sample_fn(raw, self.epoch, index)
        return load_sample(raw, self.epoch, index, (s.resolution, s.resolution), s.seed, s.center_crop,
                           s.random_flip, s.caption_dropout)  # fmt: skip

    def _worker(self, k: int) -> Iterator[dict]:
        s = self.settings
        _, plans = self.plan(self.epoch)
        plan = plans[k]
        n = plan.samples
        order = buffer_order(n, s.shuffle_buffer, np.random.default_rng([s.seed, self.epoch, self.rank, k, _BUFFER]))
        taken, first_batch = self.resume.get(k, (0, 0))
        used = np.zeros(n, dtype=bool)
        used[order[:taken]] = True
        reads = self._read(plan, int(order[taken:].min()) if taken < n else n)
        held: dict[int, tuple[int, RawRow | BadRowError]] = {}
        last_good: dict | None = None
        for b in range(first_batch, len(plan.batches)):
            samples: list[dict] = []
            bad: list[tuple[str, str]] = []
            while len(samples) < plan.sizes[b] and taken < n:
                want = int(order[taken])
                taken += 1
                while want not in held:
                    pos, index, item = next(reads)
                    if not used[pos]:
                        held[pos] = (index, item)
                index, item = held.pop(want)
                used[want] = True
                try:
                    if isinstance(item, BadRowError):
                        raise item
                    samples.append(self._decode(item, index))
                except BadRowError as err:
                    if s.on_bad_row == "error":
                        raise
                    bad.append((err.row_id, err.reason))
            if not samples:  # every remaining sample was bad: repeat one so that the processes stay in step
                if last_good is None:
                    raise ValueError(
                        f"No usable sample in a data-loader worker's share of {self.shards.description} ({len(bad)} "
                        f"bad; first: {bad[:1]}); run `controlnext check-shards`."
                    )
                samples = [last_good]
                bad.append((last_good["row_id"], "repeated once: the samples left for this batch were all bad"))
            last_good = samples[-1]
            batch = self.collate_fn([{**x, "bad_rows": []} for x in samples])
            batch["bad_rows"] = bad
            batch["stream"] = (k, plan.batches[b], taken, b + 1)
            yield batch

    def _read(self, plan: WorkerPlan, skip: int) -> Iterator[tuple[int, int, RawRow | BadRowError]]:
        """(position in the worker's sequence, sample index in the set, item) from position ``skip`` on."""
        pos = 0
        for s, first, stop in plan.pieces:
            if pos + stop - first <= skip:
                pos += stop - first
                continue
            start = first + max(0, skip - pos)
            pos += start - first
            for i, item in read_shard(self.shards.shards[s], self.shards.columns, start, stop):
                yield pos, self.offsets[s] + i, item
                pos += 1


def _identity(x):
    return x


class ShardStream:
    """The training loop's view of a shard set on one process: iterate for one epoch's batches.

    ``set_epoch(e)`` selects the epoch; ``state_dict()``/``load_state_dict()`` save and restore the position
    reached by the batches the loop has received; ``len()`` is the batches per epoch (equal on every process).
    """

    def __init__(self, shards: ShardSet, settings: StreamSettings, rank: int = 0, world: int = 1,
                 num_workers: int = 0, **dataset_kw: Any):  # fmt: skip
        if shards.samples < world:
            raise ValueError(f"{shards.description} has {shards.samples} samples, fewer than the {world} processes.")
        self.shards = shards
        self.settings = settings
        self.num_workers = num_workers
        self.dataset = _ShardDataset(shards, settings, rank, world, max(1, num_workers), **dataset_kw)
        self._len = self.dataset.plan(0)[0]  # the same every epoch
        self.epoch = 0
        self._selected: int | None = None  # the epoch the loop last selected with set_epoch
        self.batches = 0  # batches of this epoch received
        self.positions: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a position restored inside another epoch is an error (it would be dropped)."""
        self._selected = epoch
        if epoch != self.epoch:
            if 0 < self.batches < len(self):
                raise ValueError(
                    f"The streaming data position is in epoch {self.epoch} (batch {self.batches} of {len(self)}) but "
                    f"training continues with epoch {epoch}: the checkpoint was written with other settings (e.g. "
                    "--gradient-accumulation-steps); resume with the same ones."
                )
            self.epoch, self.batches, self.positions = epoch, 0, {}

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch
        self.dataset.resume = dict(self.positions)
        self.dataset.rotation = self.batches % self.dataset.workers
        if self.batches >= len(self):
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
        )
        # Like accelerate's prepared loaders, say when the epoch's last batch comes, so that a partial gradient
        # accumulation at the end of the epoch is applied there (only inside a training run: an Accelerator exists).
        from accelerate.state import GradientState

        state = GradientState() if GradientState._shared_state else None
        self.end_of_dataloader, self.remainder = False, -1
        if state is not None:
            state._add_dataloader(self)
        try:
            for batch in loader:
                k, number, taken, produced = batch.pop("stream")
                if number != self.batches:  # the plan and the loader's worker order disagree: never silently
                    raise RuntimeError(f"streaming data: expected batch {self.batches}, got {number} from worker {k}.")
                self.positions[k] = (taken, produced)
                self.batches += 1
                self.end_of_dataloader = self.batches == len(self)
                yield batch
        finally:
            if state is not None:
                state._remove_dataloader(self)

    def _key(self) -> dict:
        d = self.dataset
        return dict(processes=d.world, rank=d.rank, workers=d.workers, batch_size=self.settings.batch_size,
                    seed=self.settings.seed, shuffle_buffer=self.settings.shuffle_buffer,
                    samples=self.shards.samples, shards=self.shards.fingerprint())  # fmt: skip

    def state_dict(self) -> dict:
        """JSON-able position: epoch, batches received, and per worker (samples taken, batches produced)."""
        positions = {str(k): list(v) for k, v in sorted(self.positions.items())}
        return dict(format=_STATE_FORMAT, version=1, epoch=self.epoch, batches=self.batches, positions=positions,
                    **self._key())  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses one written with other processes, workers, batch, seed or shards."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not a streaming data position (data_state.rank*.json).")
        changed = [f"{k}: {state.get(k)} -> {v}" for k, v in self._key().items() if state.get(k) != v]
        if changed:
            raise ValueError(
                "the streaming data position was recorded with other settings (" + ", ".join(changed) + "); resume "
                "with the same number of processes, --dataloader-num-workers, batch size, seed, --shuffle-buffer and "
                "shards, or start a new run."
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
        if self._selected is not None and self._selected != self.epoch:
            self.set_epoch(self._selected)  # the loop selected its epoch first: a finished epoch moves on to it

    def save(self, folder: Path, rank: int) -> None:
        """Write this process's position into a checkpoint folder (atomically)."""
        from .checkpoint import write_text_atomic

        write_text_atomic(Path(folder) / STATE_FILE.format(rank=rank), json.dumps(self.state_dict(), indent=1))

    def restore(self, folder: Path, rank: int) -> None:
        """Read this process's position from a checkpoint folder (a clear error if it has none)."""
        path = Path(folder) / STATE_FILE.format(rank=rank)
        if not path.is_file():
            written = sorted(p.name for p in Path(folder).glob("data_state.rank*.json"))
            raise ValueError(
                f"Checkpoint {folder} has no streaming data position for process {rank} ({path.name}); it was "
                + (f"written by {len(written)} process(es): resume with that many." if written
                   else "not written by a streaming run.")  # fmt: skip
            )
        try:
            self.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:
            raise ValueError(f"Checkpoint {folder}: {err}") from None



# ------------------------------------------------------------------------------------------------ writing, checking
def image_bytes(ref: Any) -> tuple[bytes, str]:
    """(encoded bytes, extension) of an image reference; files and bytes that are images are not re-encoded."""
    from PIL import Image

    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, Image.Image):
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        return buf.getvalue(), "png"
    data = bytes(ref) if isinstance(ref, (bytes, bytearray)) else Path(ref).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "png").lower()
    return data, {"jpeg": "jpg"}.get(fmt, fmt)


def sample_members(raw: RawRow) -> dict[str, bytes]:
    """The tar members (suffix -> bytes) of one row: ``image.EXT``, ``conditioning_image.EXT``, ``txt``/``json``."""
    try:
        image, image_ext = image_bytes(raw.image)
        cond, cond_ext = image_bytes(raw.condition)
    except (OSError, ValueError) as err:  # missing file, not an image
        raise BadRowError(raw.row_id, f"image or condition could not be read ({err})") from None
    members = {f"image.{image_ext}": image, f"conditioning_image.{cond_ext}": cond}
    if isinstance(raw.caption, (list, tuple)):
        members["json"] = json.dumps(list(raw.caption)).encode()
    else:
        members["txt"] = (raw.caption or "").encode()
    return members


def write_shards(
    rows: Iterable[Callable[[], dict[str, bytes]]],
    out_dir: str | Path,
    total: int | None = None,
    samples_per_shard: int = 1000,
    cache: dict | None = None,
    progress: bool = True,
    columns: dict | None = None,
    workers: int = 1,
) -> dict:
    """Write rows (each a ``members()`` callable) as WebDataset tar shards ``shard-NNNNNN.tar`` plus ``shards.json``.

    ``members()`` returns the row's tar members or raises :class:`BadRowError` (the row is then skipped and listed in
    the returned summary). Shards are written under a temporary name and renamed when complete, with fixed member
    times, so the same rows give the same bytes. ``workers`` threads run ``members()`` ahead (reading files); the
    rows are written in their order. Returns the index written (with ``bad_rows`` added).
    """
    import webdataset as wds
    from tqdm.auto import tqdm

    from .checkpoint import write_text_atomic

    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(_kind(p.name) for p in out.iterdir()):
        raise ValueError(f"{out} already holds shards; write into an empty folder.")
    entries: list[dict] = []
    bad: list[tuple[str, str]] = []
    state: dict[str, Any] = {"writer": None, "file": None, "count": 0}

    def close() -> None:
        if state["writer"] is None:
            return
        state["writer"].close()
        tmp: Path = state["file"]
        final = tmp.with_name(tmp.name[len(".tmp-") :])
        tmp.replace(final)
        entries.append({"file": final.name, "samples": state["count"], "bytes": final.stat().st_size})
        state.update(writer=None, file=None, count=0)

    written = 0
    for result in tqdm(_ahead(rows, workers), total=total, desc="make-shards", unit="sample", disable=not progress):
        try:
            data = result()
        except BadRowError as err:
            bad.append((err.row_id, err.reason))
            continue
        if state["writer"] is None:
            state["file"] = out / f".tmp-shard-{len(entries):06d}.tar"
            state["writer"] = wds.TarWriter(str(state["file"]), mtime=0, encoder=False)
        state["writer"].write({"__key__": f"{written:09d}", **data})
        written += 1
        state["count"] += 1
        if state["count"] >= samples_per_shard:
            close()
    close()
    if not entries:
        first = "; ".join(f"row {r}: {why}" for r, why in bad[:3])
        raise ValueError(f"No row could be written ({len(bad)} bad; first: {first}).")
    index = {"format": INDEX_FORMAT, "version": 1, "samples": written, "columns": columns or vars(ColumnNames()).copy(),
             "shards": entries, "cache": cache}  # fmt: skip
    write_text_atomic(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return {**index, "bad_rows": bad}


def _ahead(calls: Iterable[Callable[[], Any]], workers: int) -> Iterator[Callable[[], Any]]:
    """The calls' results in order (each as a callable that returns or raises), up to ``4 x workers`` run ahead."""
    if workers <= 1:
        yield from calls
        return
    from collections import deque

    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque = deque()
        for call in calls:
            window.append(pool.submit(call))
            if len(window) >= 4 * workers:
                yield window.popleft().result
        while window:
            yield window.popleft().result


def check_shards(shards: ShardSet, verify: Callable[[RawRow], None] | None = None, progress: bool = True,
                 workers: int = 4) -> dict:  # fmt: skip
    """Read and decode every sample of a shard set: samples per shard and every unusable sample with its reason.

    ``verify(raw)`` checks one row (default: both images decode, have the same size, the caption is text).
    """
    from tqdm.auto import tqdm

    from .data import _caption_ok, _decode

    def default(raw: RawRow) -> None:
        image = _decode(raw.image, "image", raw.row_id)
        cond = _decode(raw.condition, "condition", raw.row_id)
        if image.size != cond.size:
            raise BadRowError(raw.row_id, f"image is {image.size[0]}x{image.size[1]} but condition is "
                              f"{cond.size[0]}x{cond.size[1]}")  # fmt: skip
        _caption_ok(raw.caption, raw.row_id)

    check = verify or default
    bar = tqdm(total=shards.samples, desc="check-shards", unit="sample", disable=not progress)

    def one(shard: Shard) -> tuple[int, list[tuple[str, str]]]:
        bad = []
        for _, item in read_shard(shard, shards.columns):
            try:
                if isinstance(item, BadRowError):
                    raise item
                check(item)
            except BadRowError as err:
                bad.append((err.row_id, err.reason))
            bar.update(1)
        return shard.samples - len(bad), bad

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, shards.shards))
    bar.close()
    per_shard = [dict(file=s.name, samples=s.samples, usable=good, bad=len(b))
                 for s, (good, b) in zip(shards.shards, results)]  # fmt: skip
    bad_rows = [b for _, bs in results for b in bs]
    return dict(shards=per_shard, samples=shards.samples, usable=shards.samples - len(bad_rows), bad_rows=bad_rows,
                problems=list(shards.problems))  # fmt: skip


def open_stream(cfg: Any, rank: int, world: int, resolution: int,
                run_once: Callable[[Callable[[], Any]], Any] = lambda work: work(), base: Any = None
                ) -> ShardStream | None:  # fmt: skip
    """The stream of this process for ``cfg.dataset`` (a :class:`~controlnext.training.config.TrainConfig`) when it
    is a shard set, else None (it is read map-style). ``run_once`` runs the counting once and shares the result
    (the training loop passes its main-process broadcast). A cache (``make-shards --cache-latents``) is checked
    against ``base``, the run's base model with its encoders in the dtypes they run in."""
    if not is_shard_set(cfg.dataset, cfg.streaming):
        return None
    if cfg.bucketing:
        raise ValueError("--bucketing needs every image size up front; streamed shards are cropped to --resolution. "
                         "Drop --bucketing, or train from an imagefolder/saved dataset.")  # fmt: skip
    columns = ColumnNames(cfg.image_column, cfg.condition_column, cfg.caption_column)

    def count() -> ShardSet:
        found = open_shards(cfg.dataset, columns, cfg.streaming, cfg.dataset_split, cfg.dataset_config, cfg.cache_dir)
        if cfg.max_train_samples:  # the first N samples, in shard order
            kept, left = [], cfg.max_train_samples
            for shard in found.shards:
                if left > 0:
                    kept.append(Shard(shard.url, min(shard.samples, left), shard.kind))
                    left -= shard.samples
            found.shards = kept
        return found

    shards = run_once(count)
    settings = StreamSettings(resolution, cfg.train_batch_size, cfg.seed, cfg.shuffle_buffer, cfg.center_crop,
                              cfg.random_flip, cfg.caption_dropout, cfg.on_bad_row)  # fmt: skip
    kw: dict[str, Any] = {}
    if shards.cache is not None:
        from .cache import collate_cached, open_cached

        if cfg.random_flip:
            raise ValueError(f"--random-flip cannot be used with the latent cache {cfg.dataset}: its latents were "
                             "computed once, unflipped. Drop --random-flip, or train from the images.")  # fmt: skip
        if base is None:
            raise ValueError(f"{cfg.dataset} is a latent cache: it needs the base model to be checked against.")
        where = f"--dataset {cfg.dataset}"
        from .cache import text_tokens

        tokens = text_tokens(base, getattr(cfg, "max_sequence_length", None))
        kw = dict(sample_fn=run_once(lambda: open_cached(shards.cache, shards.root, base, resolution, cfg.seed,
                                                         cfg.caption_dropout, where, tokens)),
                  collate_fn=collate_cached)  # fmt: skip
    return ShardStream(shards, settings, rank, world, cfg.dataloader_num_workers, **kw)
