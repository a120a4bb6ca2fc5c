"""The EDM noise schedule and loss weighting used to train Stable Video Diffusion (and the published video models).

SVD is a continuous-noise (EDM) model with v-like preconditioning for unit data variance: for noise level sigma,

    c_in = 1 / sqrt(sigma^2 + 1),  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1),
    c_noise = log(sigma) / 4,      denoised = c_skip * x_noisy + c_out * F(c_in * x_noisy, c_noise),

and the loss is the denoising error weighted by (sigma^2 + 1) / sigma^2. Training noise levels are drawn from the
"cosine interpolated" distribution of simple diffusion (the published video training script's choice; resolution
shifted between noise_d 32 and 64 for image_d 64), or from SVD's log-normal(0.7, 1.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["EDMScalings", "edm_loss", "edm_scalings", "sample_sigmas"]

SIGMA_MIN, SIGMA_MAX = 0.002, 700.0


@dataclass
class EDMScalings:
    """Per-sample preconditioning factors, shaped to broadcast over (B, F, C, H, W)."""

    c_in: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_noise: torch.Tensor  # (B,): what the UNet receives as its timestep
    weight: torch.Tensor


def edm_scalings(sigma: torch.Tensor, ndim: int = 5) -> EDMScalings:
    """The SVD preconditioning for noise levels ``sigma`` (B,)."""
    s = sigma.reshape(-1, *([1] * (ndim - 1)))
    return EDMScalings(
        c_in=1.0 / torch.sqrt(s**2 + 1.0),
        c_skip=1.0 / (s**2 + 1.0),
        c_out=-s / torch.sqrt(s**2 + 1.0),
        c_noise=0.25 * torch.log(sigma.reshape(-1)),
        weight=(s**2 + 1.0) / s**2,
    )


def edm_loss(model_output: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Weighted denoising loss: mean over samples of mean(w(sigma) * (denoised - clean)^2), computed in float32."""
    k = edm_scalings(sigma.float(), clean.dim())
    denoised = model_output.float() * k.c_out + noisy.float() * k.c_skip
    per_sample = (k.weight * (denoised - clean.float()) ** 2).reshape(clean.shape[0], -1).mean(1)
    return per_sample.mean()


def _logsnr_cosine(t: torch.Tensor, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2.0 * torch.log(torch.tan(t_min + t * (t_max - t_min)))


def sample_sigmas(
    generators: list[torch.Generator],
    kind: str = "cosine_interpolated",
    *,
    image_d: float = 64.0,
    noise_d_low: float = 32.0,
    noise_d_high: float = 64.0,
    sigma_data: float = 0.5,
    p_mean: float = 0.7,
    p_std: float = 1.6,
) -> torch.Tensor:
    """One training noise level per generator (float32, CPU).

    ``cosine_interpolated``: log-SNR of a cosine schedule shifted by 2 log(noise_d / image_d), interpolated between
    the low and high shifts along t ~ U(0, 1), for sigmas in [0.002, 700] (relative to ``sigma_data``).
    ``lognormal``: log sigma ~ N(p_mean, p_std).
    """
    u = torch.stack([torch.rand((), generator=g) for g in generators])
    if kind == "lognormal":
        normal = torch.distributions.Normal(p_mean, p_std)
        return normal.icdf(u * (1 - 2e-7) + 1e-7).exp()
    if kind != "cosine_interpolated":
        raise ValueError(f"Unknown noise-level distribution {kind!r}; use 'cosine_interpolated' or 'lognormal'.")
    logsnr_min = -2.0 * math.log(SIGMA_MIN / sigma_data)
    logsnr_max = -2.0 * math.log(SIGMA_MAX / sigma_data)

    def shifted(noise_d: float) -> torch.Tensor:
        shift = 2.0 * math.log(noise_d / image_d)
        return _logsnr_cosine(u, logsnr_min - shift, logsnr_max - shift) + shift

    logsnr = torch.lerp(shifted(noise_d_low), shifted(noise_d_high), u)
    return torch.exp(-logsnr / 2.0) * sigma_data
