"""Control fidelity: how well a generated image follows the condition it was generated from.

Two metrics, both in [0, 1] (higher is better), computed per image and averaged over a set:

**Mask IoU** (mask conditions). The generated image is segmented into foreground and background by
:func:`foreground_mask`: the background colour is the per-channel median of the image's one-pixel border, and a
pixel is foreground when any channel differs from it by more than ``threshold`` (0.2 of the [0, 1] range, i.e. 51 of
255). The score is ``|F ∩ M| / |F ∪ M|`` with ``M`` the condition mask (pixels > 0.5); it is 1 when both are empty.
This fits images with one object on a plain background (the shapes world of :mod:`controlnext.shapes`).

**Edge F1** (edge conditions). Edges of the generated image are found with the same detector that made the
condition (:func:`controlnext.shapes.world.canny_edges`: per-channel Canny 50/150, OR-ed). With ``P`` the generated
edge pixels, ``R`` the condition's edge pixels (> 0.5) and a tolerance ``d`` (default 2 pixels, Euclidean):
precision = fraction of ``P`` within ``d`` of some pixel of ``R``, recall = fraction of ``R`` within ``d`` of some
pixel of ``P``, F1 = 2 precision recall / (precision + recall). Both empty gives 1, exactly one empty gives 0.
The tolerance absorbs the one- or two-pixel shifts that a 4x-downsampling autoencoder makes unavoidable, while a
shape in the wrong place, size or orientation still scores low.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "CONDITION_KINDS",
    "FidelityReport",
    "control_fidelity",
    "evaluate_pipeline",
    "reconstruction_ceiling",
    "mean_fidelity",
    "edge_f1",
    "foreground_mask",
    "mask_iou",
    "to_uint8_rgb",
]

CONDITION_KINDS = ("edges", "mask")


def to_uint8_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, an (H, W, 3)/(3, H, W) array or tensor in [0, 1] (float) or uint8."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"Expected an RGB or grey image, got an array of shape {arr.shape}.")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _binary(plane) -> np.ndarray:
    """A condition plane (mask or edge map) as bool (H, W): pixels above half of the range, any channel."""
    arr = to_uint8_rgb(plane)
    return arr.max(axis=-1) > 127


def foreground_mask(image, threshold: float = 0.2) -> np.ndarray:
    """Bool (H, W) foreground of a one-object-on-plain-background image (see the module docstring)."""
    arr = to_uint8_rgb(image).astype(np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    return (np.abs(arr - background).max(axis=-1) > threshold * 255).astype(bool)


def mask_iou(pred, target) -> float:
    """Intersection over union of two bool masks (or condition images, binarised at 0.5); 1.0 when both are empty."""
    a = pred if isinstance(pred, np.ndarray) and pred.dtype == bool else _binary(pred)
    b = target if isinstance(target, np.ndarray) and target.dtype == bool else _binary(target)
    if a.shape != b.shape:
        raise ValueError(f"Mask shapes differ: {a.shape} vs {b.shape}; resize the condition to the image size.")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _within(src: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    """Fraction of ``src`` pixels within ``tolerance`` (Euclidean px) of a ``ref`` pixel."""
    # distanceTransform gives each pixel's distance to the nearest zero pixel: make ref's edge pixels the zeros.
    dist = cv2.distanceTransform(np.where(ref, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float((dist[src] <= tolerance).mean())


def edge_f1(pred, target, tolerance: float = 2.0) -> float:
    """F1 of two edge maps with a matching ``tolerance`` in pixels (see the module docstring)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    a = pred if isinstance(pred, np.ndarray) and pred.dtype == bool else _binary(pred)
    b = target if isinstance(target, np.ndarray) and target.dtype == bool else _binary(target)
    if a.shape != b.shape:
        raise ValueError(f"Edge map shapes differ: {a.shape} vs {b.shape}; resize the condition to the image size.")
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    precision, recall = _within(a, b, tolerance), _within(b, a, tolerance)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def control_fidelity(image, condition, kind: str, tolerance: float = 2.0, threshold: float = 0.2) -> float:
    """Fidelity of one generated ``image`` to its ``condition`` image: mask IoU (``kind='mask'``) or edge F1."""
    from .world import canny_edges

    img = to_uint8_rgb(image)
    cond = _binary(condition)
    if cond.shape != img.shape[:2]:
        cond = cv2.resize(cond.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    if kind == "mask":
        return mask_iou(foreground_mask(img, threshold), cond)
    if kind == "edges":
        return edge_f1(canny_edges(img) > 0, cond, tolerance)
    raise ValueError(f"kind must be one of {CONDITION_KINDS}, got {kind!r}.")


@dataclass
class FidelityReport:
    """Per-image scores with and without control, and their means."""

    kind: str
    with_control: list[float]
    without_control: list[float]

    @property
    def mean_with(self) -> float:
        return float(np.mean(self.with_control)) if self.with_control else float("nan")

    @property
    def mean_without(self) -> float:
        return float(np.mean(self.without_control)) if self.without_control else float("nan")

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "with_control": round(self.mean_with, 4),
            "without_control": round(self.mean_without, 4),
            "n": len(self.with_control),
        }


@torch.no_grad()
def reconstruction_ceiling(vae, images: Sequence, conditions: Sequence, kind: str, tolerance: float = 2.0) -> float:
    """The metric's ceiling for a latent model: the mean fidelity of the ground-truth ``images`` after a VAE round
    trip (encode, take the posterior mean, decode). A generator can at best match what its VAE can represent."""
    pixels = torch.stack([torch.from_numpy(to_uint8_rgb(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    out = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return float(np.mean(mean_fidelity(list(out), conditions, kind, tolerance)))


def mean_fidelity(images: Sequence, conditions: Sequence, kind: str, tolerance: float = 2.0) -> list[float]:
    """Per-image fidelity of ``images[i]`` to ``conditions[i]``."""
    if len(images) != len(conditions):
        raise ValueError(f"Got {len(images)} images for {len(conditions)} conditions; give one condition per image.")
    return [control_fidelity(im, c, kind, tolerance) for im, c in zip(images, conditions)]


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str],
    conditions: Sequence,
    kind: str,
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    scale: float = 1.0,
    batch_size: int = 16,
    tolerance: float = 2.0,
    progress: bool = False,
) -> tuple[FidelityReport, list, list]:
    """Generate each (prompt, condition) with and without control and score both; returns (report, with, without).

    ``pipe`` is a ControlNeXt pipeline (:class:`controlnext.pipelines.StableDiffusionControlNeXtPipeline`) with its
    module (and any trained UNet weights) loaded; "without control" is the base model alone, same seeds: the same
    call with ``controlnext_conditioning_scale=0`` and the UNet's base weights (:meth:`base_unet_weights`).
    Image ``i`` uses ``torch.Generator().manual_seed(seeds[i])`` (default: ``i``).
    """
    if kind not in CONDITION_KINDS:
        raise ValueError(f"kind must be one of {CONDITION_KINDS}, got {kind!r}.")
    if len(prompts) != len(conditions):
        raise ValueError(f"Got {len(prompts)} prompts for {len(conditions)} conditions; give one condition per prompt.")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"Got {len(seeds)} seeds for {len(prompts)} prompts.")
    pipe.set_progress_bar_config(disable=not progress)
    outs: dict[float, list] = {scale: [], 0.0: []}
    for s in (scale, 0.0):
        with pipe.base_unet_weights() if s == 0 else nullcontext():
            for i in range(0, len(prompts), batch_size):
                sl = slice(i, i + batch_size)
                gens = [torch.Generator().manual_seed(int(x)) for x in seeds[sl]]
                conds = [to_uint8_rgb(c).astype(np.float32) / 255.0 for c in conditions[sl]]
                res = pipe(
                    prompt=list(prompts[sl]),
                    control_image=[torch.from_numpy(c).permute(2, 0, 1) for c in conds],
                    controlnext_conditioning_scale=s,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=gens,
                    output_type="np",
                )
                outs[s] += [to_uint8_rgb(im) for im in res.images]
    report = FidelityReport(
        kind,
        mean_fidelity(outs[scale], conditions, kind, tolerance),
        mean_fidelity(outs[0.0], conditions, kind, tolerance),
    )
    return report, outs[scale], outs[0.0]
