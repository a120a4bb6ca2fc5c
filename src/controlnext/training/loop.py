"""``controlnext train``: ControlNeXt on a stock diffusers UNet (SD1.5, SDXL), on the shared training core.

Modelled on diffusers' ``train_controlnet.py``: VAE latents scaled by ``scaling_factor``, DDPM noise from the base
model's scheduler, epsilon or v-prediction targets, frozen text encoders. The control module is attached to the
UNet with :func:`controlnext.attached` for every forward (no forked UNet); the trained set is the module plus the
UNet parameters matched by the family's patterns.

This module supplies what is particular to the image trainer: the models (:func:`_build_models`), the data
(:func:`_build_data`), the objective (:func:`_loss_function`, selected per family), validation and the outputs.
The loop, checkpoints, resume, guards and logging are :class:`~controlnext.training.engine.Trainer`'s, shared with
``train-video``.

Exactness of resume: the data order is a function of (seed, epoch), augmentations of (seed, epoch, row), and each
sample's VAE noise, diffusion noise and timestep of (seed, step, micro-step, position in the global batch), each
drawn from its own CPU generator. None depends on RNG history, so a resumed run, or the same global batch split
over a different number of processes, replays the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..attention import set_attention_backend
from ..families import Family, get_family
from ..inject import injection_channels
from ..models.controlnext import ControlNeXtModel
from .base import BaseModel, PromptEncoder, load_base_model
from .cache import LatentDist, cached_prompts
from .checkpoint import write_text_atomic
from .config import TrainConfig
from .core import ControlledBackbone, randn, sample_generators
from .data import (
    ColumnNames,
    ControlDataset,
    EpochBatchSampler,
    ScanReport,
    bucket_sizes,
    collate,
    open_source,
    scan_rows,
)
from .dit import (
    TransformerPromptEncoder,
    flow_matching_step,
    flow_objective,
    flow_settings,
)
from .engine import (
    LoopSettings,
    TrainData,
    Trainer,
    frozen_loading,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    on_main,
    output_lock,
    release_accelerate_state,
)
from .export import export_outputs, write_model_card
from .guards import check_weights, warn_non_finite
from .objectives import ddpm_inputs, ddpm_loss
from .shards import ShardStream, open_stream
from .trainable import TrainableSet, apply_trainable, fingerprint, parameter_groups, select_unet_parameters
from .validation import run_validation, validation_pairs

__all__ = ["TrainResult", "train"]

log = logging.getLogger("controlnext.train")


@dataclass
class TrainResult:
    """What a run produced (on every process; files are written by the main process)."""

    output_dir: Path
    global_step: int
    losses: list[float]
    controlnext: ControlNeXtModel
    unet: nn.Module
    trainable: TrainableSet
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    rank_fingerprints: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    profile: list[dict] | None = None  # --profile: per process, see engine.Profile.summary


# ------------------------------------------------------------------------------------------------ setup helpers
def _trackers(cfg: TrainConfig) -> list[str]:
    want = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[
        cfg.report_to
    ]
    out = []
    for name in want:
        try:
            __import__("tensorboard" if name == "tensorboard" else "wandb")
            out.append(name)
        except ImportError:
            if name == "wandb":
                raise ValueError("--report-to wandb needs the wandb package: pip install wandb.") from None
            log.warning("tensorboard is not installed; training metrics are not logged (pip install tensorboard).")
    return out


def _make_controlnext(cfg: TrainConfig, unet: nn.Module, family: str) -> ControlNeXtModel:
    if cfg.controlnext:
        try:
            from ..loading import load_controlnext
        except ImportError:
            load_controlnext = None
        if load_controlnext is not None:
            # family=: a module for another family (e.g. SDXL on an SD1.5 base) is refused before training.
            module = load_controlnext(cfg.controlnext, family=family)
        else:
            module = ControlNeXtModel.from_pretrained(cfg.controlnext)
        if cfg.timestep_free and module.config.use_timestep:
            raise ValueError(
                f"--controlnext {cfg.controlnext} has a timestep input; --timestep-free trains a module without one. "
                "Drop --timestep-free, or start from a new module (no --controlnext)."
            )
        if module.config.normalization != cfg.control_injection:
            raise ValueError(
                f"--controlnext {cfg.controlnext} uses {module.config.normalization} injection but "
                f"--control-injection {cfg.control_injection} was asked; drop one of them."
            )
        point = module.config.injection_point
        if module.config.out_channels != injection_channels(unet, point):
            raise ValueError(
                f"--controlnext {cfg.controlnext} gives {module.config.out_channels} channels at its injection "
                f"point ({point}) but this {family} UNet has {injection_channels(unet, point)} there: it was made "
                "for another base model."
            )
        warn_non_finite(module, f"--controlnext {cfg.controlnext}")
        return module.to(torch.float32)
    variant = cfg.controlnext_variant or get_family(family).default_variant
    overrides = cfg.control_overrides(variant)
    from ..models.variants import variant_config

    point = overrides.get("injection_point", variant_config(variant)["injection_point"])
    overrides.setdefault("out_channels", injection_channels(unet, point))
    if cfg.timestep_free:
        overrides["use_timestep"] = False
    torch.manual_seed(cfg.seed)
    return ControlNeXtModel.from_variant(variant, normalization=cfg.control_injection, **overrides)


def _hparams(cfg: TrainConfig) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in cfg.to_dict().items()}


# ------------------------------------------------------------------------------------------------ the run
def train(cfg: TrainConfig) -> TrainResult:
    """Run one training as configured; returns the trained objects and what was written.

    Call on every process of a distributed launch. ``cfg.cpu_threads`` applies for the duration of the call.
    """
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            return _train(cfg, held)
    finally:
        torch.set_num_threads(threads)
        release_accelerate_state()


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainResult:
    cfg.validate()
    output_dir = Path(cfg.output_dir)
    trackers = _trackers(cfg)
    accelerator = make_accelerator(
        output_dir,
        cpu=cfg.cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        trackers=trackers,
    )
    held.enter_context(output_lock(accelerator, output_dir))
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    models = _build_models(cfg, accelerator)
    data = _build_data(cfg, accelerator, models)
    plan = _Plan.make(cfg, accelerator.num_processes, data.batches_per_process(accelerator.num_processes))
    trainer = _make_trainer(cfg, accelerator, models, data, plan)
    data.resumed_from = trainer.resume(cfg.resume_from_checkpoint)
    if trackers:
        accelerator.init_trackers(cfg.tracker_project_name, config=_hparams(cfg))
    pairs = validation_pairs(cfg.validation_prompt, cfg.validation_image)
    if models.flow:
        prompts = TransformerPromptEncoder(models.base, accelerator.device, models.weight_dtype,
                                           cfg.text_embedding_cache, cfg.max_sequence_length)  # fmt: skip
    else:
        prompts = PromptEncoder(models.base, accelerator.device, models.weight_dtype, cfg.text_embedding_cache)
    loss = _loss_function(cfg, models, accelerator, prompts)

    def validate(step: int) -> None:
        if pairs and accelerator.is_main_process and step % cfg.validation_steps == 0:
            _validate(cfg, models, trainer, pairs, step, trainer.ema)

    _say(
        accelerator,
        f"training {plan.max_steps} steps ({plan.num_epochs} epochs of {plan.updates_per_epoch} steps); batch "
        f"{cfg.train_batch_size} x {plan.processes} process(es) x {cfg.gradient_accumulation_steps} accumulation",
    )
    batches = data.epoch_batches(accelerator, trainer.loader)
    trainer.run(TrainData(batches, plan.updates_per_epoch, dataset=data.stream), loss, validate)
    trainer.finish()
    return _finish(cfg, accelerator, trainer, models, data, plan, pairs, prompts)


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(text)


# ------------------------------------------------------------------------------------------------ models
@dataclass
class _Models:
    """The base model, the control module and what is trained, cast and placed for training."""

    base: BaseModel
    fam: Family
    resolution: int
    controlnext: ControlNeXtModel
    patterns: list[str]
    unet_names: list[str]
    trainable: TrainableSet
    base_values: dict[str, torch.Tensor]  # the trained UNet tensors before training (for --save-unet-as deltas)
    weight_dtype: torch.dtype
    prediction_type: str  # epsilon, v_prediction, or flow (flow matching, the transformer families)
    flow: tuple | None = None  # (FlowMatching settings, Flux guidance) of a flow-matching family (training/dit.py)

    @property
    def family(self) -> str:
        return self.base.family


def _build_models(cfg: TrainConfig, accelerator) -> _Models:
    with frozen_loading(accelerator):
        base: BaseModel = load_base_model(
            cfg.pretrained_model, cfg.family, cfg.revision, cfg.base_variant, cfg.pretrained_vae
        )
    family = base.family
    fam = get_family(family)
    flow = flow_objective(cfg, fam)  # (objective, Flux guidance) for flow-matching families, else None
    resolution = cfg.resolution or fam.resolution
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1) * fam.latent_patch  # whole transformer patches
    for flag, size in (("--resolution", resolution), ("--bucket-step", cfg.bucket_step if cfg.bucketing else 0)):
        if size % factor:
            raise ValueError(f"{flag} must be a multiple of {factor} (this base's VAE downsampling), got {size}.")
    for part, module in (("unet", base.unet), ("vae", base.vae), *(("text encoder", e) for e in base.text_encoders)):
        warn_non_finite(module, f"base model {cfg.pretrained_model} ({part})")
    unet = base.unet
    controlnext = _make_controlnext(cfg, unet, family)
    patterns = cfg.train_unet if cfg.train_unet is not None else list(fam.trainable_patterns)
    unet_names = select_unet_parameters(unet, fam.trainable(controlnext.config.injection_point, patterns))
    trainable = apply_trainable(unet, controlnext, unet_names)
    _say(
        accelerator,
        f"{family} base {cfg.pretrained_model}; control module {controlnext.config.variant} "
        f"({cfg.control_injection}, injected {controlnext.config.injection_point}); UNet patterns {patterns}",
    )
    _say(accelerator, trainable.summary())
    base_values = {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if n in set(unet_names)}
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnext.enable_gradient_checkpointing()
    if cfg.attention_backend != "sdpa":  # sdpa: as diffusers loaded it
        set_attention_backend(unet, cfg.attention_backend)
    unet.train()
    controlnext.train()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Frozen weights run in the mixed-precision dtype; trained ones stay float32 for the optimizer.
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(weight_dtype)
    keep_vae_fp32 = fam.vae_fp32 and not cfg.pretrained_vae  # the stock SDXL VAE overflows in fp16
    for module, dtype in [(base.vae, torch.float32 if keep_vae_fp32 else weight_dtype)] + [
        (enc, weight_dtype) for enc in base.text_encoders
    ]:
        module.to(accelerator.device)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    prediction_type = "flow" if flow else cfg.prediction_type or base.noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(
            f"Unsupported prediction type {prediction_type!r} in the base scheduler; use --prediction-type."
        )
    if cfg.prediction_type:
        base.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    return _Models(
        base, fam, resolution, controlnext, patterns, unet_names, trainable, base_values, weight_dtype, prediction_type,
        flow,
    )


# ------------------------------------------------------------------------------------------------ data
@dataclass
class _Data:
    """The checked rows, the dataset and its epoch-wise batch order; rows that failed to load, as they come.

    A shard set (training/shards.py) is streamed instead: ``stream`` is this process's :class:`ShardStream` (it
    splits the shards over the processes itself, so accelerate does not prepare it) and the map-style parts are None.
    """

    scan: ScanReport
    dataset: ControlDataset | None
    sampler: EpochBatchSampler | None
    loader: torch.utils.data.DataLoader | None
    stream: ShardStream | None = None
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: Path | None = None  # the checkpoint the run resumed from

    def batches_per_process(self, processes: int) -> int:
        return len(self.stream) if self.stream is not None else math.ceil(len(self.sampler) / processes)

    def epoch_batches(self, accelerator, loader):
        """``TrainData.batches`` over the prepared ``loader``: one epoch, its first ``skip`` batches not loaded."""
        if self.stream is not None:
            return self._stream_batches

        def batches(epoch: int, skip: int):
            shard = accelerator.skip_first_batches(loader, skip) if skip else loader
            # accelerate's loader re-sets its sampler's epoch to its own iteration count when iterated; align both.
            shard.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            for batch in shard:
                self.bad_rows.extend(batch["bad_rows"])
                yield batch

        return batches

    def _stream_batches(self, epoch: int, skip: int):
        # The core has set the stream's epoch and restored its saved position (then ``skip`` is 0). A mid-epoch
        # checkpoint without this process's position (written by another number of processes) is a clear error.
        if skip:
            self.stream.restore(self.resumed_from, self.stream.dataset.rank)
        for batch in self.stream:
            self.bad_rows.extend(batch["bad_rows"])
            yield batch


def _build_data(cfg: TrainConfig, accelerator, models: _Models) -> _Data:
    resolution = models.resolution
    # A shard set is streamed (training/shards.py): each process reads its own shards.
    stream = open_stream(cfg, accelerator.process_index, accelerator.num_processes, resolution,
                         lambda work: on_main(accelerator, work), models.base)  # fmt: skip
    if stream is not None:
        scan = stream.shards.scan_report()
        _say(accelerator, f"data: {stream.shards.description}: {scan.good.stop} samples in "
                          f"{len(stream.shards.shards)} shards, streamed")  # fmt: skip
        if scan.bad:
            _say(accelerator, scan.summary())
        return _Data(scan, None, None, None, stream)
    source = open_source(
        cfg.dataset,
        ColumnNames(cfg.image_column, cfg.condition_column, cfg.caption_column),
        cfg.dataset_split,
        cfg.dataset_config,
        cfg.cache_dir,
    )
    scan = on_main(  # the rows are checked once
        accelerator,
        lambda: scan_rows(source, cfg.on_bad_row, check=cfg.check_data or cfg.bucketing, limit=cfg.max_train_samples),
    )
    bad = f", {len(scan.bad)} bad" if scan.bad else ""
    _say(accelerator, f"data: {source.description}: {len(scan.good)} usable rows{bad}")
    if scan.bad:
        _say(accelerator, scan.summary())
    buckets = bucket_sizes(resolution, cfg.bucket_step) if cfg.bucketing else None
    dataset = ControlDataset(
        source,
        scan,
        resolution,
        buckets,
        cfg.center_crop,
        cfg.random_flip,
        cfg.caption_dropout,
        cfg.seed,
        cfg.on_bad_row,
    )
    sampler = EpochBatchSampler(dataset.groups, cfg.train_batch_size, cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.dataloader_num_workers,
        persistent_workers=cfg.dataloader_num_workers > 0,
    )
    return _Data(scan, dataset, sampler, loader)


# ------------------------------------------------------------------------------------------------ optimisation
@dataclass
class _Plan:
    """Steps, epochs and learning-rate scale of the run."""

    processes: int
    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    lr_scale: float

    @classmethod
    def make(cls, cfg: TrainConfig, processes: int, batches_per_process: int) -> _Plan:
        updates_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * processes if cfg.scale_lr else 1
        return cls(processes, updates_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch), scale)


def _make_trainer(cfg: TrainConfig, accelerator, models: _Models, data: _Data, plan: _Plan) -> Trainer:
    unet, controlnext = models.base.unet, models.controlnext
    groups = parameter_groups(
        unet, controlnext, models.unet_names, cfg.learning_rate * plan.lr_scale, cfg.unet_learning_rate * plan.lr_scale
    )
    optimizer = make_optimizer(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        use_8bit=cfg.use_8bit_adam,
    )
    lr_scheduler = make_lr_scheduler(
        cfg.lr_scheduler,
        optimizer,
        warmup_steps=cfg.lr_warmup_steps,
        max_steps=plan.max_steps,
        num_processes=plan.processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    settings = LoopSettings(
        max_steps=plan.max_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit,
        logging_steps=cfg.logging_steps,
        exit_after_steps=cfg.exit_after_steps,
        profile_steps=cfg.profile,
    )
    resume_key = dict(
        seed=cfg.seed,
        train_batch_size=cfg.train_batch_size,
        num_processes=plan.processes,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        rows=len(data.scan.good),
        bucketing=cfg.bucketing,
        resolution=models.resolution,
    )
    return Trainer(
        accelerator,
        ControlledBackbone(unet, controlnext),
        models.unet_names,
        optimizer,
        lr_scheduler,
        settings,
        output_dir=cfg.output_dir,
        resume_key=resume_key,
        config=cfg.to_dict(),
        allow_changed_settings=cfg.allow_changed_settings,
        ema_decay=cfg.ema_decay if cfg.use_ema else None,
        loader=data.loader,
        batch_size=cfg.train_batch_size,
    )


# ------------------------------------------------------------------------------------------------ objective
def _loss_function(cfg: TrainConfig, models: _Models, accelerator, prompts: PromptEncoder):
    """The training objective of the base's family, as ``loss(model, batch, step, micro)`` for the core.

    The UNet families (SD1.5, SDXL) train DDPM epsilon / v-prediction (:mod:`.objectives`); the transformer
    families (SD3, Flux) flow matching (``Family.objective``; the batch preparation is in :mod:`.dit`). Both start
    from the same seeded VAE latents.
    """
    base, device, weight_dtype = models.base, accelerator.device, models.weight_dtype
    sf = base.vae.config.scaling_factor
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    first = accelerator.process_index * cfg.train_batch_size  # this process's position in the global batch
    objective = _ddpm_loss(cfg, models, device, prompts) if models.flow is None else None

    def loss(model: nn.Module, batch: dict, step: int, micro: int) -> torch.Tensor:
        gens = sample_generators(cfg.seed, step, micro, first, len(batch["row_ids"]))
        with torch.no_grad():
            if "latent_mean" in batch:  # the VAE posterior precomputed by make-shards --cache-latents
                dist = LatentDist(*(batch[k].to(device, base.vae.dtype) for k in ("latent_mean", "latent_std")))
            else:
                dist = base.vae.encode(batch["pixel_values"].to(device=device, dtype=base.vae.dtype)).latent_dist
            latents = dist.mean + dist.std * randn(tuple(dist.mean.shape[1:]), gens, device, dist.mean.dtype)
            latents = ((latents - shift) * sf).to(weight_dtype)
        if objective is None:
            return flow_matching_step(model, base, *models.flow, prompts, batch, latents, gens)
        return objective(model, batch, latents, gens)

    return loss


def _ddpm_loss(cfg: TrainConfig, models: _Models, device, prompts: PromptEncoder):
    """DDPM epsilon / v-prediction (with min-SNR weighting and noise offset) from seeded latents."""
    base, fam, weight_dtype, prediction_type = models.base, models.fam, models.weight_dtype, models.prediction_type
    noise_scheduler = base.noise_scheduler
    num_t = noise_scheduler.config.num_train_timesteps

    def loss(model: nn.Module, batch: dict, latents: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        noise = randn(tuple(latents.shape[1:]), gens, device, latents.dtype)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * randn((latents.shape[1], 1, 1), gens, device, latents.dtype)
        timesteps = torch.stack([torch.randint(0, num_t, (), generator=g) for g in gens]).to(device)
        noisy, target = ddpm_inputs(noise_scheduler, latents, noise, timesteps, prediction_type)
        embeds, pooled = cached_prompts(batch) if "prompt_embeds" in batch else prompts(batch["captions"])
        added = fam.added_conditioning(pooled, batch["time_ids"].to(device=device, dtype=weight_dtype))
        pred = model(noisy, timesteps, encoder_hidden_states=embeds, condition=batch["conditioning"].to(device),
                     added_cond_kwargs=added)  # fmt: skip
        return ddpm_loss(pred, target, noise_scheduler, timesteps, prediction_type, cfg.snr_gamma)

    return loss


# ------------------------------------------------------------------------------------------------ outputs
def _finish(
    cfg: TrainConfig,
    accelerator,
    trainer: Trainer,
    models: _Models,
    data: _Data,
    plan: _Plan,
    pairs: list,
    prompts: PromptEncoder,
) -> TrainResult:
    from accelerate.utils import gather_object

    step = trainer.state.global_step
    raw = trainer.raw
    raw.release()  # the hooks a checkpointed last step kept for its backward pass
    prints = gather_object([fingerprint(trainer.trainable_state())])
    result = TrainResult(
        output_dir=Path(cfg.output_dir),
        global_step=step,
        losses=trainer.new_losses,
        controlnext=raw.controlnext,
        unet=raw.backbone,
        trainable=models.trainable,
        rank_fingerprints=prints,
    )
    if trainer.profile is not None:  # --profile: the measurements only
        result.profile = trainer.profile_report()
        accelerator.end_training()
        return result
    if step < plan.max_steps:  # --exit-after-steps: leave the checkpoint, export nothing yet
        _say(accelerator, f"stopped at step {step} of {plan.max_steps}; continue with --resume-from-checkpoint latest")
        accelerator.end_training()
        return result
    all_bad = gather_object(data.bad_rows) if plan.processes > 1 else data.bad_rows
    result.bad_rows = sorted(set(map(tuple, all_bad)))
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.trained_params)  # export the averaged weights
    final_state = trainer.final_state()  # full tensors on the main process (gathered under FSDP / ZeRO-3)
    if pairs and accelerator.is_main_process and (trainer.ema is not None or step % cfg.validation_steps):
        # Final images (of the EMA weights, when used) unless the last step was just validated.
        _validate(cfg, models, trainer, pairs, step, None)
    if accelerator.is_main_process:
        check_weights(final_state.items(), step, trainer.last_good())  # the EMA average too
        files = export_outputs(
            result.output_dir, raw.controlnext.config, final_state, models.base_values, cfg.save_unet_as
        )
        if len(set(prints)) > 1 and not trainer.sharded:
            log.warning("The processes ended with different weights: %s", prints)
        _write_summary(cfg, trainer, models, data, plan, result, files, prompts)
        result.files = files
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _write_summary(
    cfg: TrainConfig,
    trainer: Trainer,
    models: _Models,
    data: _Data,
    plan: _Plan,
    result: TrainResult,
    files: dict,
    prompts: PromptEncoder,
) -> None:
    """``train_summary.json``, the model card and the closing lines (main process)."""
    output_dir, step, trainable = result.output_dir, result.global_step, models.trainable
    window = [v for _, v in trainer.state.losses[-50:]]
    final_loss = float(np.mean(window)) if window else float("nan")
    reported_bad = data.scan.bad + [b for b in result.bad_rows if b not in set(data.scan.bad)]
    summary = dict(
        steps=step,
        epochs=step / plan.updates_per_epoch,
        final_loss=final_loss,
        seconds=trainer.seconds,
        rows=len(data.scan.good),
        bad_rows=[list(b) for b in reported_bad],
        trainable=dict(
            control=trainable.control_trainable,
            unet=trainable.unet_trainable,
            unet_frozen=trainable.unet_frozen,
            unet_tensors=len(models.unet_names),
        ),
        rank_fingerprints=result.rank_fingerprints,
        files=files,
        config=cfg.to_dict(),
    )
    write_text_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    files["train_summary.json"] = "steps, losses, bad rows, trainable counts, per-process weight hashes"
    variant = result.controlnext.config.variant
    settings = {
        "family / variant": f"{models.family} / {variant}",
        "control injection": cfg.control_injection,
        "resolution": models.resolution,
        "batch": f"{cfg.train_batch_size} per device x {plan.processes} processes x "
        f"{cfg.gradient_accumulation_steps} accumulation",
        "learning rates": f"control {cfg.learning_rate * plan.lr_scale:g}, UNet "
        f"{cfg.unet_learning_rate * plan.lr_scale:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps})",
        "trained UNet parameters": f"{trainable.unet_trainable:,} in {len(models.unet_names)} tensors, "
        f"patterns `{models.patterns}`",
        "control module parameters": f"{trainable.control_trainable:,}",
        "mixed precision": trainer.accelerator.mixed_precision,
        "prediction type": models.prediction_type,
        "caption dropout": cfg.caption_dropout,
        "EMA": f"decay {cfg.ema_decay}" if cfg.use_ema else "no",
        "min-SNR gamma": cfg.snr_gamma or "no",
        "noise offset": cfg.noise_offset,
        "seed": cfg.seed,
    }
    if models.flow:  # the DDPM rows do not apply
        for key in ("prediction type", "min-SNR gamma", "noise offset"):
            del settings[key]
        settings.update(flow_settings(*models.flow, prompts))
    write_model_card(
        output_dir,
        dict(
            base_model=cfg.pretrained_model,
            family=models.family,
            variant=variant,
            control_injection=cfg.control_injection,
            steps=step,
            epochs=step / plan.updates_per_epoch,
            dataset=cfg.dataset,
            rows=len(data.scan.good),
            bad_rows=len(reported_bad),
            final_loss=final_loss,
            loss_window=len(window),
            files=files,
            settings=settings,
            command=cfg.command or "(called from Python: train(TrainConfig(...)))",
        ),
    )
    if reported_bad:
        print(f"{len(reported_bad)} bad row(s) were skipped; listed in {output_dir / 'train_summary.json'}.")
    print(f"done: {step} steps in {trainer.seconds:.1f} s; outputs in {output_dir}")


def _validate(cfg: TrainConfig, models: _Models, trainer: Trainer, pairs: list, step: int, ema) -> None:
    """Validation images of the current weights (of the EMA average when ``ema`` is given; main process)."""
    params = trainer.trained_params
    if ema is not None:  # validate the averaged weights, then put the raw ones back
        ema.store(params)
        ema.copy_to(params)
    trainer.raw.release()  # the pipeline attaches the module itself
    try:
        path = run_validation(
            base=models.base,
            unet=trainer.raw.backbone,
            controlnext=trainer.raw.controlnext,
            pairs=pairs,
            resolution=models.resolution,
            step=step,
            out_dir=Path(cfg.output_dir) / "validation",
            trackers=list(trainer.accelerator.trackers),
            device=trainer.accelerator.device,
            dtype=models.weight_dtype,
            seed=cfg.seed,
            num_images=cfg.num_validation_images,
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
        )
        if path is not None:
            log.info("validation images: %s", path)
    finally:
        if ema is not None:
            ema.restore(params)
