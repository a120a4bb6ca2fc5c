"""Tiny offline fixtures for training: a tiny base model folder and a synthetic shapes dataset with masks.

Used by the tests and for smoke-testing a training setup without downloads::

    python -c "from controlnext.testing.data import *; write_tiny_base('base'); write_shapes_dataset('data')"
    controlnext train --model base --dataset data --resolution 64 --controlnext-config tiny ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..shapes.world import COLOURS as _WORLD_COLOURS

__all__ = ["COLOURS", "SHAPES", "write_shapes_dataset", "write_tiny_base"]

# Four colours of the shapes world's palette (one colour table in the project) and two easy shapes.
COLOURS = {name: _WORLD_COLOURS[name] for name in ("red", "green", "blue", "yellow")}
SHAPES = ("square", "circle")


def write_tiny_base(path: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny randomly initialised base model (diffusers layout) for ``family`` to ``path``: a DDPM scheduler
    for the UNet families, the flow-matching scheduler and 16-channel latents for the transformers (sd3, flux).

    The random VAE is given two properties of a trained one, so that latents carry the image: a near-deterministic
    posterior (log-variance -12, instead of a random VAE's ~0, whose sampling noise would drown the image), and a
    ``scaling_factor`` of 1/std of the latents of synthetic shape images (unit-variance latents, as SD's 0.18215;
    the transformers' VAEs also get the latents' mean as ``shift_factor``, as SD3's and Flux's have one).
    """
    import torch
    from diffusers import DDPMScheduler

    from ..families import get_family
    from .models import tiny_dit_pipeline_components, tiny_pipeline_components

    path = Path(path)
    dit = get_family(family).denoiser == "transformer"
    comps = (tiny_dit_pipeline_components if dit else tiny_pipeline_components)(family, path / "_src", seed=seed)
    vae = comps["vae"]
    half = vae.config.latent_channels
    with torch.no_grad():
        moments = vae.encoder.conv_out if vae.quant_conv is None else vae.quant_conv  # (mean, log-variance) maps
        moments.weight[half:] = 0.0
        moments.bias[half:] = -12.0
        rng = np.random.default_rng(seed)
        images = []
        for _ in range(16):
            mask, _shape = _shape_mask(rng, 64)
            img = np.full((64, 64, 3), 110, np.uint8)
            img[mask] = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
            images.append(img)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    if dit:
        vae.register_to_config(shift_factor=round(latents.mean().item(), 5))
    else:
        comps["scheduler"] = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
            clip_sample=False,
        )  # fmt: skip
    get_family(family).stock_pipeline_class()(**comps).save_pretrained(str(path))
    import shutil

    shutil.rmtree(path / "_src", ignore_errors=True)
    return path


def _shape_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    r = rng.uniform(0.15, 0.3) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    return mask, shape


def write_shapes_dataset(path: str | Path, n: int = 32, size: int = 64, seed: int = 0, fmt: str = "jsonl") -> Path:
    """``n`` images of one coloured shape on grey, conditions = the shape's white-on-black mask, captions
    "a <colour> <shape>"; written as an imagefolder with metadata.jsonl (or metadata.csv with ``fmt='csv'``)."""
    path = Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    (path / "conditions").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        mask, shape = _shape_mask(rng, size)
        colour = names[int(rng.integers(len(names)))]
        img = np.full((size, size, 3), 110, np.uint8)
        img[mask] = COLOURS[colour]
        cond = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(img).save(path / "images" / f"{i:04d}.png")
        Image.fromarray(cond).save(path / "conditions" / f"{i:04d}.png")
        rows.append(
            {
                "file_name": f"images/{i:04d}.png",
                "conditioning_image_file_name": f"conditions/{i:04d}.png",
                "text": f"a {colour} {shape}",
            }
        )
    if fmt == "csv":
        import csv

        with open(path / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        with open(path / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path
