"""Training objectives as small functions: DDPM epsilon / v-prediction (SD1.5, SDXL) with optional min-SNR weighting.

The video family's EDM objective lives in :mod:`controlnext.training.video.edm`; a flow-matching objective (SD3,
Flux) belongs here beside these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ddpm_inputs", "ddpm_loss"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddpm_inputs(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latents at ``timesteps`` and the regression target (the noise, or the velocity)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unsupported prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return noisy, target


def ddpm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    scheduler=None,
    timesteps: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error in float32; with ``snr_gamma``, each sample weighted by min-SNR (Hang et al. 2023)."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * weights).mean()
