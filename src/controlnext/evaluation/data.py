"""Evaluation splits: (image, condition, caption[, label]) rows from an imagefolder or parquet files.

Two layouts are read, both as the Hugging Face hub stores MultiGen-20M-style splits:

- an **imagefolder**: ``metadata.jsonl`` whose rows name the files (``file_name`` for the image,
  ``conditioning_image_file_name`` for the condition, as ``controlnext make-dataset`` writes them) and hold the
  caption (``text``);
- **parquet**: a ``.parquet`` file, or a folder of them (searched recursively, e.g. a downloaded
  ``limingcv/MultiGen-20M_depth_eval`` snapshot), with image columns stored as ``{"bytes", "path"}`` structs.

Column names are found among the usual ones (see ``*_COLUMNS``) unless given.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["EvalSplit", "read_split"]

IMAGE_COLUMNS = ("file_name", "image")
CONDITION_COLUMNS = (
    "conditioning_image_file_name",
    "conditioning_image",
    "condition",
    "control_canny",
    "control_hed",
    "control_depth",
    "control_seg",
)
CAPTION_COLUMNS = ("text", "caption", "prompt")
LABEL_COLUMNS = ("seg_map", "label")


@dataclass
class EvalSplit:
    """Rows of an evaluation split; ``images`` / ``labels`` are None where the split has no such column."""

    prompts: list[str]
    conditions: list[np.ndarray]  # (H, W, 3) uint8
    images: list[np.ndarray] | None = None  # (H, W, 3) uint8
    labels: list[np.ndarray] | None = None  # (H, W) integer class ids
    kind: str | None = None  # the condition type named by the folder's dataset.json, if any
    columns: dict[str, str | None] = field(default_factory=dict)


def _pick(columns, wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{where} has no column {wanted!r} for the {what} (columns: {', '.join(columns)}).")
        return wanted
    return next((c for c in candidates if c in columns), None)


def _open(value, root: Path, where: str) -> Image.Image:
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        path = root / value
        if not path.is_file():
            raise ValueError(f"{where}: image file {path} does not exist.")
        return Image.open(path)
    raise ValueError(f"{where}: expected an image (file name, bytes or {{bytes, path}}), got {type(value).__name__}.")


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _label(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return arr[..., 0] if arr.ndim == 3 else arr  # class ids are stored in one channel (or repeated in all)


def _parquet_rows(path: Path, n: int | None) -> tuple[list[dict], Path]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Reading parquet needs pyarrow: pip install pyarrow.") from e
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    rows: list[dict] = []
    for f in files:  # in batches, stopping at n rows: a split's image bytes need not all be in memory
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
            rows += batch.to_pylist()
            if n is not None and len(rows) >= n:
                return rows[:n], (path.parent if path.is_file() else path)
    return rows, (path.parent if path.is_file() else path)


def _square(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Shorter side to ``size``, then the centre ``size`` x ``size`` crop."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_split(
    path: str | Path,
    n: int | None = None,
    condition_column: str | None = None,
    label_column: str | None = None,
    resolution: int | None = None,
) -> EvalSplit:
    """Read up to ``n`` rows of an evaluation split (imagefolder with metadata.jsonl, or parquet).

    ``condition_column`` may name the image column itself: the condition is then derived from the image by the
    condition type's detector (the protocol does this for Canny and HED on MultiGen-20M); :attr:`EvalSplit.conditions`
    then holds the images, and the caller derives. ``resolution`` brings every image, condition and label to
    ``resolution`` x ``resolution`` (shorter side resized, centre crop; bicubic for images, nearest for conditions
    and labels, so edge maps stay binary and class ids stay ids).
    """
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}.")

    def fit(img: Image.Image, resample: int) -> Image.Image:
        return img if resolution is None else _square(img, resolution, resample)

    path = Path(path)
    imagefolder = (path / "metadata.jsonl").is_file()
    if path.suffix == ".parquet" or (path.is_dir() and not imagefolder and any(path.rglob("*.parquet"))):
        rows, root = _parquet_rows(path, n)
        where = str(path)
    elif imagefolder:
        meta = path / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        root, where = path, str(meta)
    else:
        raise ValueError(
            f"{path} has no metadata.jsonl and no .parquet files (expected an imagefolder as written by "
            "`controlnext make-dataset`, or a MultiGen-20M-style parquet split)."
        )
    if not rows:
        raise ValueError(f"{where} has no rows.")
    rows = rows[:n] if n is not None else rows
    columns = list(rows[0])
    image_col = _pick(columns, None, IMAGE_COLUMNS, "image", where)
    cond_col = _pick(columns, condition_column, CONDITION_COLUMNS, "condition", where)
    caption_col = _pick(columns, None, CAPTION_COLUMNS, "caption", where)
    label_col = _pick(columns, label_column, LABEL_COLUMNS, "segmentation label", where)
    if cond_col is None or caption_col is None:
        raise ValueError(
            f"{where}: needs a condition column (one of {', '.join(CONDITION_COLUMNS)}, or --condition-column) and a "
            f"caption column (one of {', '.join(CAPTION_COLUMNS)}); found {', '.join(columns)}."
        )
    prompts, conds, images, labels = [], [], [], []
    for i, row in enumerate(rows):
        at = f"{where} row {i + 1}"
        if row.get(caption_col) is None or row.get(cond_col) is None:
            raise ValueError(f"{at}: needs '{cond_col}' and '{caption_col}'.")
        prompts.append(str(row[caption_col]))
        # A condition that is the image itself (to derive from) is resized like the image.
        cond_resample = Image.BICUBIC if cond_col == image_col else Image.NEAREST
        conds.append(_rgb(fit(_open(row[cond_col], root, at), cond_resample)))
        if image_col is not None and row.get(image_col) is not None:
            images.append(_rgb(fit(_open(row[image_col], root, at), Image.BICUBIC)))
        if label_col is not None and row.get(label_col) is not None:
            labels.append(_label(fit(_open(row[label_col], root, at), Image.NEAREST)))
    kind = None
    if path.is_dir() and (path / "dataset.json").is_file():
        kind = json.loads((path / "dataset.json").read_text()).get("condition")
    return EvalSplit(
        prompts,
        conds,
        images if len(images) == len(rows) else None,
        labels if len(labels) == len(rows) else None,
        kind,
        {"image": image_col, "condition": cond_col, "caption": caption_col, "label": label_col},
    )
