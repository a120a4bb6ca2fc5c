"""An objective measure of whether a trained control module takes effect.

``control_effect`` compares the denoising error of the UNet on the same noisy latents when it is given each
sample's own condition, another sample's condition (a cyclic shift of the batch), and no control at all. If the
module has learnt to use the condition, its own condition gives a clearly lower error than a wrong one: the
"swap gap" ``(swapped - own) / own`` is positive and grows with training. A falling training loss alone does not
show this (the trained UNet subset can lower it by learning the data prior); the swap gap isolates the part of
the improvement that comes from the condition.
"""

from __future__ import annotations

import torch

from ..inject import attached
from .objectives import ddpm_inputs, ddpm_loss

__all__ = ["control_effect"]


@torch.no_grad()
def control_effect(
    *,
    unet,
    controlnext,
    vae,
    noise_scheduler,
    prompt_embeds: torch.Tensor,
    pixels: torch.Tensor,
    conditions: torch.Tensor,
    timesteps: tuple[int, ...] = (200, 500, 800),
    seed: int = 0,
    added_cond_kwargs: dict | None = None,
) -> dict[str, float]:
    """Denoising MSE with own / swapped / no condition, and the relative swap gap.

    ``pixels`` (B, 3, H, W) in [-1, 1], ``conditions`` (B, 3, H, W) in [0, 1] (B >= 2, conditions distinct),
    ``prompt_embeds`` (B, 77, D). Noise is drawn from ``seed`` so that calls are comparable across checkpoints.
    """
    if pixels.shape[0] < 2:
        raise ValueError("control_effect needs a batch of at least 2 samples (conditions are swapped between them).")
    was = (unet.training, controlnext.training)
    unet.eval()
    controlnext.eval()
    try:
        dev = pixels.device
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
        gen = torch.Generator().manual_seed(seed)
        swapped = conditions.roll(1, dims=0)
        totals = {"own": 0.0, "swapped": 0.0, "none": 0.0}
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)
            ts = torch.full((latents.shape[0],), int(t), device=dev, dtype=torch.long)
            noisy, target = ddpm_inputs(noise_scheduler, latents, noise, ts, noise_scheduler.config.prediction_type)

            for name, cond in (("own", conditions), ("swapped", swapped), ("none", None)):
                if cond is None:
                    pred = unet(noisy, ts, prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
                else:
                    with attached(unet, controlnext, conditions=cond):
                        pred = unet(noisy, ts, prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
                totals[name] += ddpm_loss(pred, target).item()
        out = {k: v / len(timesteps) for k, v in totals.items()}
        out["swap_gap"] = (out["swapped"] - out["own"]) / out["own"]
        return out
    finally:
        unet.train(was[0])
        controlnext.train(was[1])
