"""Training on the transformer families (SD3/SD3.5, Flux.1): the base model, caption encoding, one flow-matching loss.

As diffusers' ``train_controlnet_sd3.py`` / ``train_controlnet_flux.py``: VAE latents shifted by ``shift_factor`` and
scaled by ``scaling_factor``, timesteps and sigmas from the base's ``FlowMatchEulerDiscreteScheduler`` (drawn with
diffusers' ``compute_density_for_timestep_sampling``), ``noisy = (1 - sigma) * x0 + sigma * noise``, target
``noise - x0`` (or x0 with preconditioned outputs), diffusers' loss weighting. SD3 is called with t in [0, 1000];
Flux with its latents packed 2x2, t / 1000, a guidance embedding and its text/image rotary ids, as its pipeline
calls it at inference (so the control module sees the same timestep scale in training and at inference).

Captions are encoded by the stock pipeline's own ``encode_prompt`` (:func:`encode_sd3_prompts`,
:func:`encode_flux_prompts`; the same embeddings as at inference), once per caption through the trainer's caption
cache, so T5 runs once per distinct caption.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..families import Family, detect_family, get_family
from ..sources import require_model_source
from .base import BaseModel, PromptEncoder
from .core import randn
from .objectives import FlowMatching, flow_matching_inputs, flow_matching_loss, flow_matching_u

__all__ = [
    "PROMPT_ENCODERS",
    "TransformerPromptEncoder",
    "encode_flux_prompts",
    "encode_sd3_prompts",
    "flow_matching_step",
    "flow_objective",
    "flow_settings",
    "is_transformer_base",
    "load_transformer_base",
    "pack_latents",
    "stock_sequence_length",
    "text_pipeline",
    "transformer_kwargs",
]


# ------------------------------------------------------------------------------------------------ the base model
def is_transformer_base(path_or_id: str, family: str = "auto") -> bool:
    """Whether the base model is of a transformer family (``family``, or detected from the folder or hub config)."""
    if family != "auto":
        return get_family(family).denoiser == "transformer"
    try:
        return detect_family(path_or_id).denoiser == "transformer"
    except ValueError:  # not readable here: the UNet loader gives its own error
        return False


def load_transformer_base(
    path_or_id: str,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
) -> BaseModel:
    """Load an SD3 or Flux base (a diffusers folder or hub id) in float32 on the CPU through its stock pipeline.

    ``BaseModel.unet`` holds the transformer; ``text_encoders`` / ``tokenizers`` are in the pipeline's order
    (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5).
    """
    from diffusers import AutoencoderKL

    local = Path(path_or_id)
    if local.exists() and not local.is_dir():
        raise ValueError(f"Base model {path_or_id!r} is a file; give a diffusers folder (transformer/, vae/, ...).")
    if not local.is_dir():
        require_model_source(path_or_id, "Base model")
    detected = detect_family(path_or_id)
    if family != "auto" and get_family(family).name != detected.name:
        raise ValueError(f"--family {family} was given but the base model {path_or_id!r} looks like {detected.name}.")
    kw: dict[str, Any] = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    if vae_path:
        sub = "vae" if (Path(vae_path) / "vae").is_dir() else None
        kw["vae"] = AutoencoderKL.from_pretrained(vae_path, subfolder=sub)
    try:
        pipe = detected.stock_pipeline_class().from_pretrained(path_or_id, **kw)
    except OSError as err:
        raise FileNotFoundError(f"Could not load the base model {path_or_id!r}: {str(err).splitlines()[0]}") from err
    suffixes = [""] + [f"_{i}" for i in range(2, detected.text_encoders + 1)]
    encoders = [getattr(pipe, f"text_encoder{s}") for s in suffixes]
    tokenizers = [getattr(pipe, f"tokenizer{s}") for s in suffixes]
    for module in (pipe.vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(detected.name, pipe.transformer, pipe.vae, encoders, tokenizers, pipe.scheduler, str(path_or_id))


# ------------------------------------------------------------------------------------------------ captions
def text_pipeline(base: BaseModel):
    """The family's stock pipeline holding only the base's tokenizers and text encoders (for ``encode_prompt``)."""
    fam = get_family(base.family)
    parts: dict[str, Any] = {}
    for i, (encoder, tokenizer) in enumerate(zip(base.text_encoders, base.tokenizers)):
        suffix = f"_{i + 1}" if i else ""
        parts.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": tokenizer})
    return fam.stock_pipeline_class()(transformer=None, vae=None, scheduler=None, **parts)


def stock_sequence_length(family: str) -> int:
    """The T5 length the family's stock pipeline encodes prompts at (its ``encode_prompt`` default)."""
    pipeline = get_family(family).stock_pipeline_class()
    return inspect.signature(pipeline.encode_prompt).parameters["max_sequence_length"].default


def encode_sd3_prompts(pipe, captions: list[str], device, max_sequence_length: int = 256) -> dict[str, torch.Tensor]:
    """SD3's conditioning of ``captions`` as ``StableDiffusion3Pipeline.encode_prompt`` makes it (no guidance):
    ``encoder_hidden_states`` (B, 77 + T5 tokens, D) and ``pooled_projections`` (B, pooled CLIP-L + CLIP-G)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def encode_flux_prompts(pipe, captions: list[str], device, max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
    """Flux's conditioning of ``captions`` as ``FluxPipeline.encode_prompt`` makes it: ``encoder_hidden_states`` (B,
    T5 tokens, D) and ``pooled_projections`` (B, pooled CLIP-L). (Its text ids are zeros, made per call.)"""
    embeds, pooled, _ = pipe.encode_prompt(captions, None, device=device, max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


# One caption-encoding function per transformer family: (text pipeline, captions, device, T5 length) -> tensors.
PROMPT_ENCODERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "sd3": encode_sd3_prompts,
    "flux": encode_flux_prompts,
}


class TransformerPromptEncoder(PromptEncoder):
    """The trainer's caption cache (:class:`~controlnext.training.base.PromptEncoder`) over the family's stock
    ``encode_prompt``: returns (encoder_hidden_states, pooled_projections). ``max_sequence_length`` defaults to the
    stock pipeline's. Cached embeddings are kept in CPU memory: with T5 one caption holds 1-4 MB (SD3: 77 + 256
    tokens x 4096 in bf16), too much to keep a thousand on the accelerator."""

    def __init__(self, base: BaseModel, device, dtype, cache_size: int = 1024, max_sequence_length: int | None = None):
        super().__init__(base, device, dtype, cache_size)
        self.pipe = text_pipeline(base)
        self.max_sequence_length = max_sequence_length or stock_sequence_length(base.family)
        self._fn = PROMPT_ENCODERS[base.family]

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._fn(self.pipe, captions, self.device, self.max_sequence_length)
        keep = "cpu" if self.cache_size > 0 else self.device
        return tuple(out[k].to(keep, self.dtype) for k in ("encoder_hidden_states", "pooled_projections"))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in super().__call__(captions))


# ------------------------------------------------------------------------------------------------ the objective
def flow_objective(cfg, fam: Family) -> tuple[FlowMatching, float | None] | None:
    """The flow-matching settings and Flux guidance value of a run (``None`` for a DDPM family).

    Options of the other objective are refused with one line, rather than silently ignored.
    """
    flow_only = {
        "--precondition-outputs": cfg.precondition_outputs,
        "--guidance-scale": cfg.guidance_scale,
        "--max-sequence-length": cfg.max_sequence_length,
    }
    ddpm_only = {"--prediction-type": cfg.prediction_type, "--snr-gamma": cfg.snr_gamma,
                 "--noise-offset": cfg.noise_offset or None}  # fmt: skip
    if fam.objective != "flow_matching":
        given = [flag for flag, value in flow_only.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]} applies to flow-matching families (SD3, Flux), not to {fam.title}.")
        return None
    given = [flag for flag, value in ddpm_only.items() if value is not None]
    if given:
        raise ValueError(
            f"{given[0]} is a DDPM option; {fam.title} trains with flow matching (see --weighting-scheme, "
            "--precondition-outputs)."
        )
    defaults = fam.objective_defaults
    precondition = cfg.precondition_outputs
    objective = FlowMatching(
        weighting_scheme=cfg.weighting_scheme,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
        precondition_outputs=defaults.get("precondition_outputs", False) if precondition is None else precondition,
    )
    guidance = defaults.get("guidance_scale") if cfg.guidance_scale is None else cfg.guidance_scale
    return objective, guidance


def flow_settings(objective: FlowMatching, guidance: float | None, prompts: TransformerPromptEncoder) -> dict:
    """The model card's rows for the objective."""
    scheme = objective.weighting_scheme
    if scheme == "logit_normal":
        scheme += f" (mean {objective.logit_mean:g}, std {objective.logit_std:g})"
    elif scheme == "mode":
        scheme += f" (scale {objective.mode_scale:g})"
    rows = {
        "objective": "flow matching, " + ("x0 (preconditioned outputs)" if objective.precondition_outputs
                                          else "velocity noise - x0") + " target",  # fmt: skip
        "timestep density / loss weighting": scheme,
        "T5 tokens per caption": prompts.max_sequence_length,
    }
    if guidance is not None:
        rows["guidance embedding"] = guidance
    return rows


def _sd3_call(latents, timesteps, embeds, pooled, guidance, transformer) -> dict[str, Any]:
    return dict(timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled)


def _flux_call(latents, timesteps, embeds, pooled, guidance, transformer) -> dict[str, Any]:
    from diffusers import FluxPipeline

    b, _, h, w = latents.shape
    use_guidance = transformer.config.guidance_embeds and guidance is not None
    return dict(
        timestep=timesteps / 1000,  # as FluxPipeline calls it; the adapter gives the encoder t in [0, 1000]
        guidance=torch.full((b,), float(guidance), device=latents.device) if use_guidance else None,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, embeds.dtype),
    )


def _flux_pack(x: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(x, *x.shape)


# Per family: how latents are laid out for the transformer, and its call's keyword arguments.
_CALLS = {"sd3": (lambda x: x, _sd3_call), "flux": (_flux_pack, _flux_call)}


def pack_latents(family: str, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, h, w) as the family's transformer takes them: unchanged for SD3, 2x2-packed tokens for
    Flux (as the stock pipelines pack them)."""
    return _CALLS[family][0](latents)


def transformer_kwargs(
    family: str,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float | None,
    transformer: torch.nn.Module,
) -> dict[str, Any]:
    """The transformer's call arguments besides the sample, as the family's stock pipeline passes them (``latents``
    unpacked, for their grid; ``timesteps`` in [0, 1000]; ``guidance`` only where the model embeds it)."""
    return _CALLS[family][1](latents, timesteps, embeds, pooled, guidance, transformer)


def flow_matching_step(
    model: Callable[..., torch.Tensor],
    base: BaseModel,
    objective: FlowMatching,
    guidance: float | None,
    prompts: PromptEncoder,
    batch: dict,
    latents: torch.Tensor,
    gens: list[torch.Generator],
) -> torch.Tensor:
    """The loss of one batch: ``latents`` are the shifted and scaled VAE latents (B, C, h, w); noise and the timestep
    density draw come from the per-sample generators ``gens``; ``model`` is the controlled transformer."""
    noise = randn(tuple(latents.shape[1:]), gens, latents.device, latents.dtype)
    x0, eps = pack_latents(base.family, latents), pack_latents(base.family, noise)
    noisy, timesteps, sigmas = flow_matching_inputs(base.noise_scheduler, x0, eps, flow_matching_u(objective, gens))
    if "prompt_embeds" in batch:  # a latent cache (make-shards --cache-latents): T5 ran once, when it was made
        from .cache import cached_prompts

        embeds, pooled = cached_prompts(batch)
    else:
        embeds, pooled = prompts(batch["captions"])
    kwargs = transformer_kwargs(base.family, latents, timesteps, embeds, pooled, guidance, base.unet)
    pred = model(noisy, condition=batch["conditioning"].to(latents.device), **kwargs)
    return flow_matching_loss(objective, pred, noisy, x0, eps, sigmas)
