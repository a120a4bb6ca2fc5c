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
order depends only on (seed, step), so resuming from a checkpoint reproduces an uninterrupted run. Checkpoints
use the training package's atomic ``checkpoint-N`` folders (``accelerator.save_state``).
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
from tqdm.auto import tqdm

from ...inject import injection_channels
from ...models.controlnext import ControlNeXtModel
from ..checkpoint import (
    MANIFEST,
    check_resume_settings,
    lock_output_dir,
    remove_partial,
    resolve_resume,
    save_checkpoint,
    write_text_atomic,
)
from ..core import ControlledBackbone, randn, sample_generators
from ..export import staged_outputs
from ..guards import check_loss, check_mixed_precision, check_weights, warn_non_finite
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
    from ..loop import _release_accelerate_state

    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            return _train_video(cfg, held)
    finally:
        _release_accelerate_state()  # a later run in this process may use other accelerate settings


def _train_video(cfg: VideoTrainConfig, held: contextlib.ExitStack) -> VideoTrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.optimization import get_scheduler

    cfg.validate()
    out_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(out_dir)),
    )
    main = accelerator.is_main_process
    check_mixed_precision(accelerator)
    if main:
        held.enter_context(lock_output_dir(out_dir))
        remove_partial(out_dir / "checkpoints")
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- models
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
    if main:
        print(f"video training: control module {controlnext.config.variant}; UNet patterns {cfg.train_unet}")
        print(trainable.summary())
    base_values = {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if n in set(unet_names)}
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnext.enable_gradient_checkpointing()
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for frozen in (vae, image_encoder):
        frozen.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:
            frozen.to(dtype=dtype)
    unet.train()
    controlnext.train()

    # ---- data and optimisation
    dataset = VideoPoseDataset(cfg.dataset, cfg.width, cfg.height, cfg.num_frames, cfg.sample_stride)
    per_step = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(len(dataset) / per_step)
    groups = parameter_groups(unet, controlnext, unet_names, cfg.learning_rate, cfg.unet_learning_rate)
    optimizer = torch.optim.AdamW(
        groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    procs = accelerator.num_processes
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * procs, num_training_steps=max_steps * procs
    )
    model = ControlledBackbone(unet, controlnext)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    batcher = _Batcher(cfg, vae, image_encoder, base.feature_extractor, dtype)

    # ---- resume
    global_step, losses = 0, []
    from ..loop import _on_main

    # Verified (sizes and SHA-256) once, on the main process.
    resume = _on_main(accelerator, lambda: resolve_resume(cfg.resume_from_checkpoint, out_dir / "checkpoints"))
    if resume is not None:
        manifest = json.loads((resume / MANIFEST).read_text())
        check_resume_settings(resume, manifest.get("resume_key", {}), cfg.resume_key(procs), cfg.allow_changed_settings)
        accelerator.load_state(str(resume))
        global_step, losses = int(manifest["step"]), list(manifest.get("losses", []))
        if main:
            print(f"resumed from {resume} at step {global_step}")

    sampler = StepBatchSampler(
        len(dataset), cfg.train_batch_size, cfg.seed, max_steps, global_step, cfg.gradient_accumulation_steps,
        accelerator.process_index, procs,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_video, num_workers=cfg.dataloader_num_workers
    )

    def probe() -> float:
        """Loss on the first clip's first sample with fixed noise (comparable across the run)."""
        batch = collate_video([dataset[(0, cfg.seed)]])
        model.eval()
        with torch.no_grad():
            value = batcher.loss(model, batch, sample_generators(cfg.seed, PROBE_STREAM, 0, 0, 1)).item()
        model.train()
        return value

    probe_before = probe() if cfg.probe_loss and global_step == 0 else None
    bar = tqdm(total=max_steps, initial=global_step, desc="video training", disable=not main)
    last_good = str(resume) if resume is not None else None

    def trained_named() -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    micro = 0
    step_loss = 0.0
    for batch in loader:
        first = (micro * procs + accelerator.process_index) * cfg.train_batch_size
        gens = sample_generators(cfg.seed, global_step, micro, first, batch["pixel_values"].shape[0])
        with accelerator.accumulate(model):
            loss = batcher.loss(model, batch, gens)
            check_loss(loss, global_step + 1, last_good)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += accelerator.gather(loss.detach()[None]).mean().item() / cfg.gradient_accumulation_steps
        micro += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        losses.append(step_loss)
        bar.update()
        bar.set_postfix(loss=f"{step_loss:.4f}")
        micro, step_loss = 0, 0.0
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0 and global_step < max_steps:
            check_weights(trained_named(), global_step, last_good)
            extra = {"losses": losses, "resume_key": cfg.resume_key(procs)}
            last_good = str(save_checkpoint(accelerator, out_dir / "checkpoints", global_step,
                                            cfg.checkpoints_total_limit, extra))  # fmt: skip
    bar.close()

    # ---- outputs
    accelerator.unwrap_model(model).release()
    controlnext_out = accelerator.unwrap_model(model).controlnext
    files: dict[str, str] = {}
    extra = {"losses": losses, "resume_key": cfg.resume_key(procs)}
    check_weights(trained_named(), global_step, last_good)
    save_checkpoint(accelerator, out_dir / "checkpoints", global_step, cfg.checkpoints_total_limit, extra)
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
    return VideoTrainResult(out_dir, global_step, losses, controlnext_out, unet, unet_names, probe_losses, files)
