"""Training objectives as small functions: DDPM epsilon / v-prediction (SD1.5, SDXL) with optional min-SNR weighting,
and rectified flow matching (SD3, Flux) as diffusers' ``train_controlnet_sd3.py`` / ``train_controlnet_flux.py`` use it.

Which one a family trains with is ``Family.objective`` (:mod:`controlnext.families`). The video family's EDM
objective lives in :mod:`controlnext.training.video.edm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import FLOW_WEIGHTINGS

__all__ = [
    "FLOW_WEIGHTINGS",
    "FlowMatching",
    "ddpm_inputs",
    "ddpm_loss",
    "flow_matching_inputs",
    "flow_matching_loss",
    "flow_matching_u",
]

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


@dataclass(frozen=True)
class FlowMatching:
    """Settings of the flow-matching objective (the options of diffusers' SD3/Flux training scripts).

    ``precondition_outputs``: the prediction v is turned into an x0 estimate ``noisy - sigma * v`` and regressed on
    the clean latents, as ``train_controlnet_sd3.py`` does by default (``--precondition_outputs 1``); without it the
    target is the velocity ``noise - x0``, as ``train_controlnet_flux.py`` trains.
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False

    def __post_init__(self) -> None:
        if self.weighting_scheme not in FLOW_WEIGHTINGS:
            raise ValueError(
                f"Unknown weighting scheme {self.weighting_scheme!r}; expected one of {', '.join(FLOW_WEIGHTINGS)}."
            )


def flow_matching_u(objective: FlowMatching, gens: list[torch.Generator]) -> torch.Tensor:
    """One draw of diffusers' ``compute_density_for_timestep_sampling`` per sample, each from its own generator."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return torch.cat(
        [
            compute_density_for_timestep_sampling(
                weighting_scheme=objective.weighting_scheme,
                batch_size=1,
                logit_mean=objective.logit_mean,
                logit_std=objective.logit_std,
                mode_scale=objective.mode_scale,
                generator=g,
            )
            for g in gens
        ]
    )


def flow_matching_inputs(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, timesteps, sigmas) for density samples ``u`` in [0, 1): the training schedule's entry at
    ``int(u * num_train_timesteps)`` of a ``FlowMatchEulerDiscreteScheduler`` (its ``timesteps`` in [0, 1000] and
    ``sigmas``, shift included), and ``noisy = (1 - sigma) * x0 + sigma * noise``. ``sigmas`` is shaped to broadcast
    over ``latents``."""
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype)
    sigmas = sigmas.reshape(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise, timesteps, sigmas


def flow_matching_loss(
    objective: FlowMatching,
    pred: torch.Tensor,
    noisy: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """The weighted mean squared error of diffusers' SD3/Flux scripts, in float32: per-sample means, then the mean."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if objective.precondition_outputs:
        pred, target = pred * (-sigmas) + noisy, latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=objective.weighting_scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1)
    return per_sample.mean()
