"""Write the shapes dataset to disk in the Hugging Face ``datasets`` imagefolder convention.

Layout (``load_dataset("imagefolder", data_dir=OUT)`` gives columns ``image``, ``conditioning_image``, ``text``)::

    OUT/metadata.jsonl          one JSON object per line:
                                {"file_name": "images/00000.png",
                                 "conditioning_image_file_name": "conditioning_images/00000.png",
                                 "text": "a red star on a blue background", "shape": ..., "colour": ..., ...}
    OUT/images/00000.png        the RGB image
    OUT/conditioning_images/    the condition (edges or mask), white on black, RGB
    OUT/dataset.json            generator parameters (seed, n, size, condition), to regenerate the same data
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .world import condition_image, render_sample

__all__ = ["write_dataset"]


def write_dataset(
    out: str | Path, n: int, seed: int = 0, condition: str = "edges", size: int = 64, progress: bool = True
) -> Path:
    """Render ``n`` samples with ``seed`` and write them (with ``condition`` images) under ``out``; returns ``out``.

    Refuses to write into a non-empty folder that is not a previous shapes dataset (so nothing else is overwritten);
    over a previous one, the images it had beyond this run's are removed.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}.")
    if condition not in ("edges", "mask"):
        raise ValueError(f"condition must be 'edges' or 'mask', got {condition!r}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "dataset.json").exists():
        raise FileExistsError(f"{out} exists, is not empty and is not a shapes dataset; choose an empty folder.")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning_images").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    rows, written = [], set()
    for i in tqdm(range(n), desc="shapes", unit="img", disable=not progress):
        s = render_sample(seed, i, size)
        name = f"{i:0{width}d}.png"
        written.add(name)
        Image.fromarray(s.image).save(out / "images" / name)
        Image.fromarray(condition_image(s, condition)).save(out / "conditioning_images" / name)
        meta = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.meta.items()}
        rows.append(
            {
                "file_name": f"images/{name}",
                "conditioning_image_file_name": f"conditioning_images/{name}",
                "text": s.caption,
                **meta,
            }
        )
    # A previous run with a larger n (or other names) leaves images that metadata.jsonl no longer lists.
    for folder in ("images", "conditioning_images"):
        for stale in (out / folder).glob("*.png"):
            if stale.name not in written:
                stale.unlink()
    with open(out / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    params = {"generator": "controlnext.shapes.world", "seed": seed, "n": n, "size": size, "condition": condition}
    (out / "dataset.json").write_text(json.dumps(params, indent=2) + "\n")
    return out
