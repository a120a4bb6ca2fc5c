"""Training the video models: a ControlNeXt module (and, as published, the SVD UNet) on video + pose clips.

One optimisation step, as in the published SVD training:

1. the clip's frames are VAE-encoded (a latent sample, scaled by the VAE's factor); the reference image gives the
   CLIP image embedding and, after noise augmentation, the unscaled conditioning latent repeated over the frames;
2. conditioning dropout (for classifier-free guidance): with probability p the embedding, with p the latent, with p
   both are zeroed;
3. a noise level sigma is drawn per sample (:func:`~controlnext.training.video.edm.sample_sigmas`), the UNet sees
   ``c_in * (x + sigma * n)`` and ``c_noise``, with the pose frames as the control, and the loss is the
   EDM-weighted denoising error (:func:`~controlnext.training.video.edm.edm_loss`).

Everything random is drawn from per-sample generators seeded by (seed, step, micro-step, position), and the data
order depends only on (seed, step), so resuming from a checkpoint reproduces an uninterrupted run. The loop,
checkpoints, resume and guards are the shared :class:`~controlnext.training.engine.Trainer`'s (as for
``controlnext train``); this module supplies the models, the data and the EDM objective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...attention import set_attention_backend
from ...inject import injection_channels
from ...models.controlnext import ControlNeXtModel
from ..checkpoint import write_text_atomic
from ..core import ControlledBackbone, randn, sample_generators
from ..engine import (
    LoopSettings,
    TrainData,
    Trainer,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    output_lock,
    release_accelerate_state,
)
from ..export import staged_outputs
from ..guards import warn_non_finite
from ..trainable import apply_trainable, parameter_groups, select_unet_parameters
from .config import VideoTrainConfig
from .data import StepBatchSampler, VideoPoseDataset, collate_video
from .edm import edm_loss, edm_scalings, sample_sigmas

__all__ = ["VideoTrainResult", "train_video"]

log = logging.getLogger("controlnext.train.video")

CONTROLNEXT_FILE = "controlnext.safetensors"
UNET_FILE = "unet.safetensors"
PROBE_STREAM = 2**40  # a "step" number no training step uses, for the probe batch's noise


@dataclass
class VideoTrainResult:
    """What a run produced. ``probe_losses``: loss on a fixed batch with fixed noise before and after training."""

    output_dir: Path
    global_step: int
    losses: list[float]
    controlnext: ControlNeXtModel
    unet: nn.Module
    unet_names: list[str]
    probe_losses: tuple[float, float] | None = None
    files: dict[str, str] = field(default_factory=dict)


def _make_controlnext(cfg: VideoTrainConfig, unet: nn.Module) -> ControlNeXtModel:
    if cfg.controlnext:
        from ...loading import load_controlnext

        module = load_controlnext(cfg.controlnext, variant=cfg.controlnext_variant, family="svd",
                                  allow_pickle=cfg.allow_pickle).float()  # fmt: skip
        warn_non_finite(module, f"--controlnext {cfg.controlnext}")
        return module
    from ...models.variants import variant_config

    overrides = cfg.control_overrides()
    point = overrides.get("injection_point", variant_config(cfg.controlnext_variant)["injection_point"])
    overrides.setdefault("out_channels", injection_channels(unet, point))
    torch.manual_seed(cfg.seed)
    return ControlNeXtModel.from_variant(cfg.controlnext_variant, **overrides)


class _Batcher:
    """Turns a data batch into the UNet inputs and the loss (frozen VAE and CLIP encoder inside)."""

    def __init__(self, cfg: VideoTrainConfig, vae, image_encoder, feature_extractor, dtype: torch.dtype):
        self.cfg, self.vae, self.image_encoder, self.dtype = cfg, vae, image_encoder, dtype
        self.mean = torch.tensor(feature_extractor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(feature_extractor.image_std).view(1, 3, 1, 1)
        self.clip_size = int(image_encoder.config.image_size)

    @torch.no_grad()
    def _embed(self, reference: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        x = (_resize_with_antialiasing(reference.float(), (self.clip_size, self.clip_size)) + 1.0) / 2.0
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return self.image_encoder(x.to(self.dtype)).image_embeds[:, None]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], gens: list[torch.Generator]) -> torch.Tensor:
        cfg, device = self.cfg, next(self.vae.parameters()).device
        pixels = batch["pixel_values"].to(device, self.dtype)
        b, f = pixels.shape[:2]
        with torch.no_grad():
            dist = self.vae.encode(pixels.flatten(0, 1)).latent_dist
            eps = torch.stack([torch.randn((f, *dist.mean.shape[1:]), generator=g) for g in gens]).flatten(0, 1)
            latents = (dist.mean + dist.std * eps.to(dist.mean)) * self.vae.config.scaling_factor
            latents = latents.reshape(b, f, *latents.shape[1:]).float()
            reference = batch["reference"].to(device, torch.float32)
            emb = self._embed(reference)
            aug = randn(reference.shape[1:], gens, reference.device, reference.dtype)
            noisy_ref = reference + cfg.noise_aug_strength * aug
            cond = self.vae.encode(noisy_ref.to(self.dtype)).latent_dist.mode()
        if cfg.conditioning_dropout_prob > 0:
            u = torch.stack([torch.rand((), generator=g) for g in gens]).to(device)
            p = cfg.conditioning_dropout_prob
            # As in the release (InstructPix2Pix's scheme): the embedding is dropped for u < 2p, the image latent
            # for p <= u < 3p, so each alone with probability p and both together with probability p.
            emb = emb * (u >= 2 * p).to(emb.dtype).view(b, 1, 1)
            cond = cond * (~((u >= p) & (u < 3 * p))).to(cond.dtype).view(b, 1, 1, 1)
        sigma = sample_sigmas(gens, cfg.noise_distribution).to(device)
        noise = randn(latents.shape[1:], gens, latents.device, latents.dtype)
        noisy = latents + noise * sigma.view(b, 1, 1, 1, 1)
        k = edm_scalings(sigma)
        inp = torch.cat([noisy * k.c_in, cond[:, None].expand(-1, f, -1, -1, -1).float()], dim=2)
        ids = torch.tensor([[cfg.fps - 1, cfg.motion_bucket_id, cfg.noise_aug_strength]], device=device).repeat(b, 1)
        pred = model(
            inp.to(self.dtype), k.c_noise.to(self.dtype), encoder_hidden_states=emb.to(self.dtype),
            added_time_ids=ids.to(self.dtype), condition=batch["pose"].to(device, self.dtype),
        )  # fmt: skip
        return edm_loss(pred, noisy, latents, sigma)


def train_video(cfg: VideoTrainConfig) -> VideoTrainResult:
    """Run one video training as configured (call on every process of a distributed launch)."""
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            return _train_video(cfg, held)
    finally:
        release_accelerate_state()  # a later run in this process may use other accelerate settings


def _train_video(cfg: VideoTrainConfig, held: contextlib.ExitStack) -> VideoTrainResult:
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(
        out_dir, gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision
    )
    held.enter_context(output_lock(accelerator, out_dir))
    main = accelerator.is_main_process
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    base, unet, controlnext, unet_names, base_values = _build_models(cfg, accelerator, dtype)

    # ---- data and optimisation
    dataset = VideoPoseDataset(cfg.dataset, cfg.width, cfg.height, cfg.num_frames, cfg.sample_stride)
    procs = accelerator.num_processes
    per_step = cfg.train_batch_size * procs * cfg.gradient_accumulation_steps
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(len(dataset) / per_step)
    groups = parameter_groups(unet, controlnext, unet_names, cfg.learning_rate, cfg.unet_learning_rate)
    optimizer = make_optimizer(
        groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    lr_scheduler = make_lr_scheduler(
        cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps, max_steps=max_steps, num_processes=procs
    )
    settings = LoopSettings(
        max_steps=max_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit,
        description="video training",
    )
    trainer = Trainer(
        accelerator,
        ControlledBackbone(unet, controlnext),
        unet_names,
        optimizer,
        lr_scheduler,
        settings,
        output_dir=out_dir,
        resume_key=cfg.resume_key(procs),
        config=cfg.to_dict(),
        allow_changed_settings=cfg.allow_changed_settings,
    )
    batcher = _Batcher(cfg, base.vae, base.image_encoder, base.feature_extractor, dtype)
    trainer.resume(cfg.resume_from_checkpoint)

    def batches(epoch: int, skip: int):
        """Every remaining step in one pass: the sampler splits each global batch over processes and micro-steps."""
        sampler = StepBatchSampler(
            len(dataset), cfg.train_batch_size, cfg.seed, max_steps, skip // cfg.gradient_accumulation_steps,
            cfg.gradient_accumulation_steps, accelerator.process_index, procs,
        )  # fmt: skip
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_video, num_workers=cfg.dataloader_num_workers
        )

    def loss(model: nn.Module, batch: dict, step: int, micro: int) -> torch.Tensor:
        first = (micro * procs + accelerator.process_index) * cfg.train_batch_size
        gens = sample_generators(cfg.seed, step, micro, first, batch["pixel_values"].shape[0])
        return batcher.loss(model, batch, gens)

    def probe() -> float:
        """Loss on the first clip's first sample with fixed noise (comparable across the run)."""
        batch = collate_video([dataset[(0, cfg.seed)]])
        trainer.model.eval()
        with torch.no_grad():
            value = batcher.loss(trainer.model, batch, sample_generators(cfg.seed, PROBE_STREAM, 0, 0, 1)).item()
        trainer.model.train()
        return value

    probe_before = probe() if cfg.probe_loss and trainer.state.global_step == 0 else None
    trainer.run(TrainData(batches, updates_per_epoch=max_steps), loss)
    trainer.finish()

    # ---- outputs
    trainer.raw.release()  # the training hooks, kept for a checkpointed backward pass
    controlnext_out = trainer.raw.controlnext
    files: dict[str, str] = {}
    if main:
        from ...loading import save_controlnext_file, save_unet_weights

        with staged_outputs(out_dir) as staging:  # complete files only, each moved into place in one rename
            save_controlnext_file(controlnext_out, staging / CONTROLNEXT_FILE)
            files["controlnext"] = str(out_dir / CONTROLNEXT_FILE)
            if unet_names:
                base_sd = base_values if cfg.save_unet_as == "deltas" else None
                save_unet_weights(unet, staging / UNET_FILE, unet_names, base_sd)
                files["unet"] = str(out_dir / UNET_FILE)
        write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    probe_losses = (probe_before, probe()) if probe_before is not None else None
    if main and probe_losses:
        print(f"probe loss: {probe_losses[0]:.4f} -> {probe_losses[1]:.4f}")
    accelerator.end_training()
    losses = [value for _, value in trainer.state.losses]
    return VideoTrainResult(
        out_dir, trainer.state.global_step, losses, controlnext_out, unet, unet_names, probe_losses, files
    )


def _build_models(cfg: VideoTrainConfig, accelerator, dtype: torch.dtype):
    """The SVD base (its UNet, VAE and image encoder cast and placed), the control module and the trained set."""
    from diffusers import StableVideoDiffusionPipeline

    try:
        base = StableVideoDiffusionPipeline.from_pretrained(cfg.pretrained_model)
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not load the base SVD model {cfg.pretrained_model!r}: {err}") from err
    unet, vae, image_encoder = base.unet, base.vae, base.image_encoder
    if cfg.unet_weights:
        from ...loading import load_unet_weights

        load_unet_weights(unet, cfg.unet_weights, allow_pickle=cfg.allow_pickle)
    for what, module in (("unet", unet), ("vae", vae), ("image encoder", image_encoder)):
        source = cfg.unet_weights if what == "unet" and cfg.unet_weights else cfg.pretrained_model
        warn_non_finite(module, f"{source} ({what})")
    controlnext = _make_controlnext(cfg, unet)
    unet_names = select_unet_parameters(unet, cfg.train_unet)
    trainable = apply_trainable(unet, controlnext, unet_names)
    if accelerator.is_main_process:
        print(f"video training: control module {controlnext.config.variant}; UNet patterns {cfg.train_unet}")
        print(trainable.summary())
    base_values = {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if n in set(unet_names)}
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnext.enable_gradient_checkpointing()
    if cfg.attention_backend != "sdpa":  # sdpa: as diffusers loaded it
        set_attention_backend(unet, cfg.attention_backend)
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for frozen in (vae, image_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device)
        if dtype != torch.float32:
            frozen.to(dtype=dtype)
    unet.train()
    controlnext.train()
    return base, unet, controlnext, unet_names, base_values
