"""Validation during training: generate for (prompt, condition) pairs, save an image grid, log it to the trackers."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..families import get_family

__all__ = ["validation_pairs", "make_grid", "run_validation"]

log = logging.getLogger(__name__)


def validation_pairs(prompts: list[str], images: list[str]) -> list[tuple[str, str]]:
    """Pair prompts with condition images (one of either is broadcast to the other's count)."""
    if not prompts or not images:
        return []
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(images) == 1:
        images = images * len(prompts)
    return list(zip(prompts, images))


def make_grid(rows: list[list[Image.Image]], cell: tuple[int, int]) -> Image.Image:
    """One row per validation pair: the condition, then the generated images, each resized to ``cell``."""
    cols = max(len(r) for r in rows)
    w, h = cell
    grid = Image.new("RGB", (cols * w, len(rows) * h))
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h)), (x * w, y * h))
    return grid




@torch.no_grad()
def run_validation(
    *,
    base,
    unet,
    controlnext,
    pairs: list[tuple[str, str]],
    resolution: int,
    step: int,
    out_dir: Path,
    trackers: list,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    num_images: int = 1,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
) -> Path | None:
    """Generate ``num_images`` per pair with the ControlNeXt pipeline; returns the saved grid (None if skipped)."""
    from diffusers import UniPCMultistepScheduler

    family = get_family(base.family)

    # A fresh scheduler: the training one's tables must stay as they are. Flow-matching bases sample with their own.
    sampler = UniPCMultistepScheduler if family.objective == "ddpm" else type(base.noise_scheduler)
    comps = dict(
        vae=base.vae,
        **{family.denoiser: unet},
        scheduler=sampler.from_config(base.noise_scheduler.config),
        controlnext=controlnext,
        **family.pipeline_kwargs,
    )
    for i, (encoder, tokenizer) in enumerate(zip(base.text_encoders, base.tokenizers)):
        suffix = f"_{i + 1}" if i else ""
        comps.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": tokenizer})
    pipe = family.pipeline_class()(**comps)
    pipe.set_progress_bar_config(disable=True)
    was_training = (unet.training, controlnext.training)
    unet.eval()
    controlnext.eval()
    rows = []
    try:
        for prompt, image_path in pairs:
            cond = Image.open(image_path).convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
            images = []
            for i in range(num_images):
                gen = torch.Generator(device="cpu").manual_seed(seed + i)
                autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
                with autocast:
                    out = pipe(
                        prompt=prompt,
                        control_image=cond,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=gen,
                        height=resolution,
                        width=resolution,
                        output_type="pil",
                    )
                images.append(out.images[0])
            rows.append([cond, *images])
    finally:
        unet.train(was_training[0])
        controlnext.train(was_training[1])
    grid = make_grid(rows, (resolution, resolution))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step-{step:07d}.png"
    grid.save(path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(p for p, _ in pairs))]}, step=step)
    return path
