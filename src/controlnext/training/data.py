"""Training data: (image, condition image, caption) rows in the Hugging Face ``datasets`` conventions.

Sources (see :func:`open_source`):

* a local imagefolder-style folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` is the image column
  ``image``; every ``X_file_name`` column is the image column ``X``, e.g. ``conditioning_image_file_name``), read
  directly so that each row keeps its id and a bad file fails only its own row;
* a dataset saved with ``save_to_disk``, local ``.parquet`` file(s), or a hub dataset id (through ``datasets``).

Every row is checked before training (file present and readable, image and condition of equal size); bad rows are
reported with their row id and skipped (counted and summarised) or, with ``on_bad_row='error'``, stop the run.
A row that only fails when fully decoded is replaced in its batch by the next good row of the same size bucket
(and reported), so batches keep their size and distributed ranks stay in step.

Randomness (crop, flip, caption choice and dropout) is a pure function of (seed, epoch, row), and the batch order
a pure function of (seed, epoch): a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..sources import require_dataset_source

__all__ = [
    "BadRowError",
    "ColumnNames",
    "ControlDataset",
    "EpochBatchSampler",
    "RowSource",
    "ScanReport",
    "bucket_sizes",
    "collate",
    "load_sample",
    "open_source",
    "scan_rows",
]

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class BadRowError(ValueError):
    """A dataset row that cannot be used (missing or unreadable file, size mismatch, bad caption)."""

    def __init__(self, row_id: str, reason: str | None = None):
        if reason is None:
            # Re-raised by a DataLoader worker with the worker's traceback as the only argument: keep its last line.
            last = [line for line in str(row_id).splitlines() if line.strip()][-1]
            row_id, _, reason = last.split("bad dataset row ", 1)[-1].partition(": ")
        super().__init__(f"bad dataset row {row_id}: {reason}")
        self.row_id = row_id
        self.reason = reason


@dataclass(frozen=True)
class ColumnNames:
    """Names of the image, condition and caption columns (the ``datasets`` / diffusers defaults)."""

    image: str = "image"
    condition: str = "conditioning_image"
    caption: str = "text"


@dataclass
class RawRow:
    row_id: str
    image: Any  # path, bytes, {"bytes", "path"} dict or PIL image
    condition: Any
    caption: Any


# ---------------------------------------------------------------------------------------------------- sources
class RowSource:
    """Random access to raw rows; ``raw(i)`` raises :class:`BadRowError` for rows it cannot even read."""

    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> RawRow:
        raise NotImplementedError


def _metadata_key(row: dict, column: str) -> str | None:
    """The metadata key holding ``column``: the column itself, ``column_file_name``, or ``file_name`` for 'image'."""
    for key in (column, f"{column}_file_name", "file_name" if column == "image" else None):
        if key is not None and key in row:
            return key
    return None


class MetadataFolder(RowSource):
    """An imagefolder with ``metadata.jsonl``/``metadata.csv``; file paths are relative to the metadata file."""

    def __init__(self, metadata: Path, columns: ColumnNames):
        self.root = metadata.parent
        self.columns = columns
        self.description = str(metadata)
        self.rows: list[dict | str] = []  # a str is a line that did not parse (reported as a bad row)
        if metadata.suffix == ".jsonl":
            with open(metadata, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        self.rows.append(obj if isinstance(obj, dict) else f"line is not a JSON object: {line[:80]!r}")
                    except json.JSONDecodeError as err:
                        self.rows.append(f"line is not valid JSON ({err.msg}): {line[:80]!r}")
        else:
            with open(metadata, encoding="utf-8", newline="") as f:
                self.rows.extend(csv.DictReader(f))
        if not self.rows:
            raise ValueError(f"{metadata} has no rows.")
        self._check_columns()

    def _check_columns(self) -> None:
        sample = next((r for r in self.rows if isinstance(r, dict)), None)
        if sample is None:
            raise ValueError(f"No row of {self.description} could be parsed (first problem: {self.rows[0]}).")
        for kind, col in (("image", self.columns.image), ("condition", self.columns.condition)):
            if _metadata_key(sample, col) is None:
                raise ValueError(
                    f"{self.description} has no {kind} column {col!r} (looked for {col!r} and '{col}_file_name'); "
                    f"its columns are {sorted(sample)}. Pass --{kind}-column with the right name."
                )
        if self.columns.caption not in sample:
            raise ValueError(
                f"{self.description} has no caption column {self.columns.caption!r}; its columns are {sorted(sample)}. "
                "Pass --caption-column with the right name."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, index: int) -> RawRow:
        row = self.rows[index]
        if isinstance(row, str):
            raise BadRowError(f"{index}", row)
        key_img = _metadata_key(row, self.columns.image)
        key_cond = _metadata_key(row, self.columns.condition)
        name = row.get(key_img) if key_img else None
        row_id = f"{index} [{name}]" if name else str(index)
        if key_img is None or key_cond is None or not row.get(key_img) or not row.get(key_cond):
            raise BadRowError(row_id, "image or condition file name is missing")
        return RawRow(
            row_id, self.root / str(row[key_img]), self.root / str(row[key_cond]), row.get(self.columns.caption)
        )


class HFDatasetSource(RowSource):
    """A ``datasets.Dataset``; image columns are read undecoded so that each row is decoded (and checked) here."""

    def __init__(self, dataset, columns: ColumnNames, description: str, base_dir: Path | None = None):
        import datasets

        self.columns = columns
        self.description = description
        self.base_dir = base_dir
        names = dataset.column_names
        for kind, col in (("image", columns.image), ("condition", columns.condition), ("caption", columns.caption)):
            if col not in names:
                raise ValueError(
                    f"Dataset {description} has no {kind} column {col!r}; its columns are {names}. "
                    f"Pass --{kind}-column with the right name."
                )
        for col in (columns.image, columns.condition):
            if isinstance(dataset.features[col], datasets.Image):
                dataset = dataset.cast_column(col, datasets.Image(decode=False))
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> RawRow:
        row = self.dataset[index]
        image, condition = (self._resolve(row[c]) for c in (self.columns.image, self.columns.condition))
        return RawRow(str(index), image, condition, row[self.columns.caption])

    def _resolve(self, value: Any) -> Any:
        """Relative file paths (plain, or in an undecoded image without bytes) are tried as given, then against the
        dataset's folder."""
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
        if self.base_dir is None or not isinstance(path, str) or Path(path).is_absolute() or Path(path).exists():
            return value
        return self.base_dir / path


def open_source(
    spec: str,
    columns: ColumnNames = ColumnNames(),
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> RowSource:
    """Open a local folder/file or a hub dataset id as a :class:`RowSource`."""
    path = Path(spec)
    if path.is_dir():
        for candidate in (path, path / split):
            for name in METADATA_FILES:
                if (candidate / name).is_file():
                    return MetadataFolder(candidate / name, columns)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(
                        f"Saved dataset {path} has splits {list(ds)}, not {split!r}; pass --dataset-split."
                    )
                ds = ds[split]
            return HFDatasetSource(ds, columns, str(path), base_dir=path)
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return _parquet(parquet, columns, str(path), cache_dir, base_dir=path)
        raise FileNotFoundError(
            f"Dataset folder {path} has no metadata.jsonl/metadata.csv (imagefolder), no saved dataset "
            "(dataset_info.json) and no .parquet files."
        )
    if path.is_file():
        if path.suffix == ".parquet":
            return _parquet([str(path)], columns, str(path), cache_dir, base_dir=path.parent)
        if path.name in METADATA_FILES or path.suffix in (".jsonl", ".csv"):
            return MetadataFolder(path, columns)
        raise ValueError(f"Dataset file {path} is neither a .parquet file nor a metadata.jsonl/.csv file.")
    require_dataset_source(spec, "Dataset")
    import datasets

    try:
        _ask_hub(spec)
        ds = datasets.load_dataset(spec, config_name, split=split, cache_dir=cache_dir)
    except Exception as err:  # network, unknown id, ...: say what was tried, in one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, ConnectionError):
            reason = "the hub cannot be reached (offline?)"
        raise ValueError(
            f"Dataset {spec!r} is not a local path and could not be loaded from the hub: {reason}. Give an existing "
            "dataset folder or file, or a hub dataset id while online."
        ) from err
    return HFDatasetSource(ds, columns, spec)


def _ask_hub(spec: str) -> None:
    """One request for hub dataset ``spec`` (unless offline): no network or no such dataset is a ConnectionError
    or LookupError at once, instead of the datasets library's minute of retries with a warning each."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:  # the datasets cache answers
        return
    try:
        HfApi().dataset_info(spec, timeout=10)
    except GatedRepoError:
        return  # it exists; datasets says what access needs
    except RepositoryNotFoundError:
        raise LookupError("no such hub dataset (or it is private and no token was given)") from None
    except HfHubHTTPError:
        return  # the hub answered with another error: let datasets try (and explain)
    except Exception as err:  # the HTTP client's connection errors are not OSErrors
        raise ConnectionError(str(err)) from err


def _parquet(files: list[str], columns: ColumnNames, description: str, cache_dir, base_dir: Path) -> HFDatasetSource:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    return HFDatasetSource(ds, columns, description, base_dir=base_dir)


# ---------------------------------------------------------------------------------------------------- images
def _open(ref: Any, what: str, row_id: str) -> Image.Image:
    """Open an image reference lazily (header only); raise BadRowError with the cause."""
    try:
        if isinstance(ref, Image.Image):
            return ref
        if isinstance(ref, dict):  # datasets.Image(decode=False)
            if ref.get("bytes"):
                return Image.open(io.BytesIO(ref["bytes"]))
            ref = ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            return Image.open(io.BytesIO(ref))
        if ref is None:
            raise BadRowError(row_id, f"{what} is empty")
        return Image.open(ref)
    except FileNotFoundError:
        raise BadRowError(row_id, f"{what} file not found: {ref}") from None
    except Image.DecompressionBombError as err:  # not an OSError: without this it would end the whole run
        raise BadRowError(row_id, f"{what} is too large to decode safely: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        if isinstance(err, BadRowError):
            raise
        raise BadRowError(
            row_id, f"{what} is not a readable image ({ref if isinstance(ref, (str, Path)) else 'bytes'}): {err}"
        ) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (e.g. depth) -> 8-bit keeping the full range
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(ref: Any, what: str, row_id: str) -> Image.Image:
    img = _open(ref, what, row_id)
    try:
        img.load()
        return _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise BadRowError(row_id, f"{what} is too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadRowError(row_id, f"{what} could not be decoded: {err}") from None


def _caption_ok(caption: Any, row_id: str) -> None:
    if caption is None or isinstance(caption, str):
        return
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return
    raise BadRowError(row_id, f"caption must be text or a list of texts, got {type(caption).__name__}")


# ---------------------------------------------------------------------------------------------------- scan
@dataclass
class ScanReport:
    """Result of checking every row: usable row indices with their (width, height), and the bad rows."""

    good: list[int]
    sizes: list[tuple[int, int]]
    bad: list[tuple[str, str]] = field(default_factory=list)
    checked: bool = True

    def summary(self, limit: int = 10) -> str:
        lines = [f"{len(self.bad)} bad row(s) skipped, {len(self.good)} used:"]
        lines += [f"  row {rid}: {reason}" for rid, reason in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        return "\n".join(lines)


def _check_row(source: RowSource, index: int) -> tuple[int, tuple[int, int] | None, tuple[str, str] | None]:
    try:
        raw = source.raw(index)
        with _open(raw.image, "image", raw.row_id) as img:
            img_size = img.size
        with _open(raw.condition, "condition", raw.row_id) as cond:
            cond_size = cond.size
        if img_size != cond_size:
            raise BadRowError(
                raw.row_id, f"image is {img_size[0]}x{img_size[1]} but condition is {cond_size[0]}x{cond_size[1]}"
            )
        _caption_ok(raw.caption, raw.row_id)
        return index, img_size, None
    except BadRowError as err:
        return index, None, (err.row_id, err.reason)


def scan_rows(
    source: RowSource, on_bad_row: str = "skip", check: bool = True, workers: int = 8, limit: int | None = None
) -> ScanReport:
    """Check every row (headers only: files exist, are images, sizes match, captions are text).

    ``on_bad_row='error'`` raises :class:`BadRowError` on the first bad row. With ``check=False`` nothing is read
    and every row is assumed usable (bad ones are then caught when loaded). ``limit`` keeps the first rows only.
    """
    n = len(source) if limit is None else min(limit, len(source))
    if not check:
        return ScanReport(good=list(range(n)), sizes=[(0, 0)] * n, checked=False)
    good, sizes, bad = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, size, problem in pool.map(lambda i: _check_row(source, i), range(n), chunksize=64):
            if problem is not None:
                if on_bad_row == "error":
                    raise BadRowError(*problem)
                bad.append(problem)
            else:
                good.append(index)
                sizes.append(size)
    if not good:
        first = "; ".join(f"row {r}: {why}" for r, why in bad[:3])
        raise ValueError(f"No usable rows in {source.description} ({len(bad)} bad; first: {first}).")
    return ScanReport(good, sizes, bad)


# ---------------------------------------------------------------------------------------------------- buckets
def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets, multiples of ``step``, of about ``resolution``² pixels, aspect up to ``max_ratio``."""
    if resolution % step:
        raise ValueError(f"--resolution {resolution} must be a multiple of the bucket step {step}.")
    out = {(resolution, resolution)}
    area = resolution * resolution
    w = step
    while w <= resolution * max_ratio:
        h = int(area / w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    """Index of the bucket whose aspect ratio is nearest (in log space) to each (width, height)."""
    logs = np.log([w / h for w, h in buckets])
    return [int(np.argmin(np.abs(logs - math.log(w / h)))) for w, h in sizes]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, position)`` keys; the order is a pure function of (seed, epoch).

    Positions are grouped by bucket (all samples of a batch share a size), shuffled within each bucket, cut into
    batches, and the batches shuffled. Call :meth:`set_epoch` before iterating.
    """

    def __init__(
        self, groups: list[list[int]], batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False
    ):
        self.groups = [g for g in groups if g]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        out: list[list[int]] = []
        for group in self.groups:
            order = [group[i] for i in rng.permutation(len(group))] if self.shuffle else list(group)
            for i in range(0, len(order), self.batch_size):
                chunk = order[i : i + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        if self.shuffle and len(self.groups) > 1:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self):
        epoch = self.epoch
        for batch in self.batches(epoch):
            yield [(epoch, p) for p in batch]

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self.groups)
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)


# ---------------------------------------------------------------------------------------------------- dataset
class ControlDataset(torch.utils.data.Dataset):
    """Decoded, augmented training samples keyed by ``(epoch, position)`` (see :class:`EpochBatchSampler`).

    A sample holds ``pixel_values`` (3, H, W) in [-1, 1], ``conditioning`` (3, H, W) in [0, 1] (the same crop and
    flip), ``caption`` (after dropout), SDXL's ``time_ids`` (original size, crop corner, target size) and ``row_id``.
    """

    def __init__(
        self,
        source: RowSource,
        scan: ScanReport,
        resolution: int,
        buckets: list[tuple[int, int]] | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        on_bad_row: str = "skip",
    ):
        self.source = source
        self.rows = scan.good
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.on_bad_row = on_bad_row
        if buckets and scan.checked:
            self.bucket_dims = buckets
            self.bucket_of = assign_buckets(scan.sizes, buckets)
        else:
            self.bucket_dims = [(resolution, resolution)]
            self.bucket_of = [0] * len(self.rows)
        self.groups: list[list[int]] = [[] for _ in self.bucket_dims]
        self.slot: list[int] = []  # position of each row inside its bucket's group
        for pos, b in enumerate(self.bucket_of):
            self.slot.append(len(self.groups[b]))
            self.groups[b].append(pos)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, pos = key
        bad: list[tuple[str, str]] = []
        group = self.groups[self.bucket_of[pos]]
        for attempt in range(min(len(group), 32)):
            # A row that fails to decode is replaced by the next row of its bucket (deterministically).
            cur = group[(self.slot[pos] + attempt) % len(group)]
            try:
                sample = self._load(epoch, cur)
                sample["bad_rows"] = bad
                return sample
            except BadRowError as err:
                if self.on_bad_row == "error":
                    raise
                bad.append((err.row_id, err.reason))
        raise ValueError(f"Too many unreadable rows in a row: {bad[:5]}")

    def _load(self, epoch: int, pos: int) -> dict:
        index = self.rows[pos]
        size = self.bucket_dims[self.bucket_of[pos]]
        return load_sample(self.source.raw(index), epoch, index, size, self.seed, self.center_crop, self.random_flip,
                           self.caption_dropout)  # fmt: skip


def load_sample(
    raw: RawRow,
    epoch: int,
    index: int,
    size: tuple[int, int],
    seed: int,
    center_crop: bool = False,
    random_flip: bool = False,
    caption_dropout: float = 0.0,
) -> dict:
    """Decode and augment one row to ``size`` (width, height); the randomness is a function of (seed, epoch, index).

    Raises :class:`BadRowError` for a row that cannot be decoded (shared by the map-style and streaming datasets).
    """
    image = _decode(raw.image, "image", raw.row_id)
    cond = _decode(raw.condition, "condition", raw.row_id)
    if image.size != cond.size:
        raise BadRowError(
            raw.row_id, f"image is {image.size[0]}x{image.size[1]} but condition is {cond.size[0]}x{cond.size[1]}"
        )
    _caption_ok(raw.caption, raw.row_id)
    rng = np.random.default_rng([seed, epoch, index])
    tw, th = size
    w, h = image.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if center_crop:
        left, top = (rw - tw) // 2, (rh - th) // 2
    else:
        left, top = int(rng.integers(0, rw - tw + 1)), int(rng.integers(0, rh - th + 1))
    flip = bool(random_flip and rng.random() < 0.5)

    def transform(img: Image.Image) -> Image.Image:  # identical geometry for image and condition
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        img = img.crop((left, top, left + tw, top + th))
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img

    pixels = torch.from_numpy(np.asarray(transform(image), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    condition = torch.from_numpy(np.asarray(transform(cond), dtype=np.float32)).permute(2, 0, 1) / 255.0
    caption = raw.caption
    if isinstance(caption, (list, tuple)):
        caption = caption[int(rng.integers(0, len(caption)))]
    caption = caption or ""
    if caption_dropout > 0 and rng.random() < caption_dropout:
        caption = ""
    time_ids = torch.tensor([h, w, top, left, th, tw], dtype=torch.float32)  # SDXL micro-conditioning
    return dict(pixel_values=pixels, conditioning=condition, caption=caption, time_ids=time_ids, row_id=raw.row_id)


def collate(samples: list[dict]) -> dict:
    """Stack a list of samples into a batch; bad rows met while loading are passed on for reporting."""
    return dict(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]).contiguous(),
        conditioning=torch.stack([s["conditioning"] for s in samples]).contiguous(),
        time_ids=torch.stack([s["time_ids"] for s in samples]),
        captions=[s["caption"] for s in samples],
        row_ids=[s["row_id"] for s in samples],
        bad_rows=[b for s in samples for b in s["bad_rows"]],
    )
