"""The training loop: ControlNeXt on a stock diffusers UNet, with accelerate.

Modelled on diffusers' ``train_controlnet.py``: VAE latents scaled by ``scaling_factor``, DDPM noise from the base
model's scheduler, epsilon or v-prediction targets, frozen text encoders. The control module is attached to the
UNet with :func:`controlnext.attached` for every forward (no forked UNet); the trained set is the module plus the
UNet parameters matched by the family's patterns.

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
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..families import get_family
from ..inject import injection_channels
from ..models.controlnext import ControlNeXtModel
from .base import BaseModel, PromptEncoder, load_base_model
from .checkpoint import (
    check_resume_settings,
    lock_output_dir,
    remove_partial,
    resolve_resume,
    save_checkpoint,
    write_text_atomic,
)
from .config import TrainConfig
from .core import ControlledBackbone, randn, sample_generators
from .data import ColumnNames, ControlDataset, EpochBatchSampler, bucket_sizes, collate, open_source, scan_rows
from .dit import (
    TransformerPromptEncoder,
    flow_matching_step,
    flow_objective,
    flow_settings,
    is_transformer_base,
    load_transformer_base,
)
from .export import export_outputs, write_model_card
from .guards import check_loss, check_mixed_precision, check_weights, warn_non_finite
from .objectives import ddpm_inputs, ddpm_loss
from .trainable import (
    TrainableSet,
    apply_trainable,
    fingerprint,
    parameter_groups,
    select_unet_parameters,
)
from .validation import run_validation, validation_pairs

__all__ = ["TrainResult", "train"]

log = logging.getLogger("controlnext.train")

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
LOSS_HISTORY = 1000  # steps of loss kept in checkpoints (for the model card's final loss after a resume)


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


@dataclass
class _RunState:
    global_step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    resume_key: dict = field(default_factory=dict)


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
    overrides = cfg.control_overrides()
    from ..models.variants import variant_config

    point = overrides.get("injection_point", variant_config(variant)["injection_point"])
    overrides.setdefault("out_channels", injection_channels(unet, point))
    torch.manual_seed(cfg.seed)
    return ControlNeXtModel.from_variant(variant, normalization=cfg.control_injection, **overrides)


def _has_accelerator() -> bool:
    # Without one, processes started by `accelerate launch --multi_gpu` / torchrun must form a CPU (gloo) group:
    # accelerate only does so when told to use the CPU.
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def _on_main(accelerator, work):
    """Run ``work()`` once, on the main process, and share its result (or its error) with the others."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return work()
    payload: list = [None]
    if accelerator.is_main_process:
        try:
            payload = [("ok", work())]
        except (ValueError, FileNotFoundError) as err:  # every process must stop, not wait for the main one
            payload = [("error", str(err))]
    broadcast_object_list(payload)
    kind, value = payload[0]
    if kind == "error":
        raise ValueError(value)
    return value


def _sharded(accelerator) -> bool:
    """True when parameters are sharded across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


def _optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes.") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _hparams(cfg: TrainConfig) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in cfg.to_dict().items()}


def _read_checkpoint_file(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file; a damaged file (not caught by an older, size-only manifest) is one error."""
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Checkpoint {folder}: {name} is damaged ({err}).") from None


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
        _release_accelerate_state()


def _release_accelerate_state() -> None:
    """Let a later train() call in this (single) process use other accelerate settings, e.g. mixed precision."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return  # a distributed launch: the process group belongs to the launcher
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg.validate()
    output_dir = Path(cfg.output_dir)
    trackers = _trackers(cfg)
    accelerator = Accelerator(
        cpu=cfg.cpu or not _has_accelerator(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    check_mixed_precision(accelerator)
    if main:
        held.enter_context(lock_output_dir(output_dir))
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models
    dit = is_transformer_base(cfg.pretrained_model, cfg.family)  # SD3 / Flux: see training/dit.py
    base: BaseModel = (load_transformer_base if dit else load_base_model)(
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
    say(
        f"{family} base {cfg.pretrained_model}; control module {controlnext.config.variant} "
        f"({cfg.control_injection}, injected {controlnext.config.injection_point}); UNet patterns {patterns}"
    )
    say(trainable.summary())
    base_values = {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if n in set(unet_names)}
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnext.enable_gradient_checkpointing()
    unet.train()
    controlnext.train()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    # Frozen weights run in the mixed-precision dtype; trained ones stay float32 for the optimizer.
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(weight_dtype)
    keep_vae_fp32 = fam.vae_fp32 and not cfg.pretrained_vae  # the stock SDXL VAE overflows in fp16
    for module, dtype in [(base.vae, torch.float32 if keep_vae_fp32 else weight_dtype)] + [
        (enc, weight_dtype) for enc in base.text_encoders
    ]:
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    prediction_type = "flow" if flow else cfg.prediction_type or base.noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(
            f"Unsupported prediction type {prediction_type!r} in the base scheduler; use --prediction-type."
        )
    if cfg.prediction_type:
        base.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)

    # ---- data
    source = open_source(
        cfg.dataset,
        ColumnNames(cfg.image_column, cfg.condition_column, cfg.caption_column),
        cfg.dataset_split,
        cfg.dataset_config,
        cfg.cache_dir,
    )
    scan = _on_main(  # the rows are checked once
        accelerator,
        lambda: scan_rows(source, cfg.on_bad_row, check=cfg.check_data or cfg.bucketing, limit=cfg.max_train_samples),
    )
    say(f"data: {source.description}: {len(scan.good)} usable rows" + (f", {len(scan.bad)} bad" if scan.bad else ""))
    if scan.bad and main:
        print(scan.summary())
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

    # ---- schedule
    procs = accelerator.num_processes
    batches_per_process = math.ceil(len(sampler) / procs)
    updates_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * procs if cfg.scale_lr else 1
    groups = parameter_groups(unet, controlnext, unet_names, cfg.learning_rate * scale, cfg.unet_learning_rate * scale)
    optimizer = _optimizer(cfg, groups)
    # The prepared scheduler steps once per process per update (accelerate's convention), hence the `* procs`.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * procs,
        num_training_steps=max_steps * procs,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    model = ControlledBackbone(unet, controlnext)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    trained_params = [p for g in groups for p in g["params"]]
    sharded = _sharded(accelerator)
    if cfg.use_ema and sharded:
        raise ValueError(
            "--use-ema is not supported with FSDP or DeepSpeed ZeRO-3 (sharded weights); use DDP/ZeRO-1/2."
        )
    ema = EMAModel(trained_params, decay=cfg.ema_decay) if cfg.use_ema else None
    if ema is not None:
        ema.to(device)

    run = _RunState(
        resume_key=dict(
            seed=cfg.seed,
            train_batch_size=cfg.train_batch_size,
            num_processes=procs,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            rows=len(scan.good),
            bucketing=cfg.bucketing,
            resolution=resolution,
        )
    )
    trainable_keys = [f"controlnext.{k}" for k in controlnext.state_dict()] + [f"unet.{n}" for n in unet_names]

    def trainable_state() -> dict[str, torch.Tensor]:
        sd = {f"controlnext.{k}": v for k, v in controlnext.state_dict().items()}
        params = dict(unet.named_parameters())
        sd.update({f"unet.{n}": params[n] for n in unet_names})
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    def save_hook(models, weights, out_dir):
        if not weights:  # DeepSpeed/FSDP: accelerate saved the (sharded) model itself
            trainable_file = None
        else:
            weights.pop()  # the full UNet is frozen: store only what is trained
            trainable_file = TRAINABLE_FILE
        if not main:
            return
        out = Path(out_dir)
        if trainable_file:
            save_file(trainable_state(), str(out / trainable_file), metadata={"format": "pt"})
        if ema is not None:
            save_file(
                {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, str(out / EMA_FILE)
            )
        state = dict(
            global_step=run.global_step,
            losses=run.losses[-LOSS_HISTORY:],
            resume_key=run.resume_key,
            ema=None if ema is None else dict(optimization_step=ema.optimization_step, decay=ema.decay),
            config=cfg.to_dict(),
        )
        (out / STATE_FILE).write_text(json.dumps(state, indent=1))

    def load_hook(models, in_dir):
        in_dir = Path(in_dir)
        if models:
            models.pop()
            sd = _read_checkpoint_file(in_dir, TRAINABLE_FILE)
            missing = sorted(set(trainable_keys) - set(sd))
            unexpected = sorted(set(sd) - set(trainable_keys))
            if missing or unexpected:
                raise ValueError(
                    f"Checkpoint {in_dir} was written for a different trainable set (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}): resume with the same --train-unet and control module settings."
                )
            controlnext.load_state_dict(
                {k[len("controlnext.") :]: v for k, v in sd.items() if k.startswith("controlnext.")}
            )
            params = dict(unet.named_parameters())
            with torch.no_grad():
                for n in unet_names:
                    params[n].copy_(sd[f"unet.{n}"])
        state = json.loads((in_dir / STATE_FILE).read_text())
        if ema is not None:
            if not (in_dir / EMA_FILE).is_file():
                raise ValueError(f"Checkpoint {in_dir} has no EMA weights but --use-ema was given.")
            shadow = _read_checkpoint_file(in_dir, EMA_FILE)
            for i, p in enumerate(ema.shadow_params):
                p.data.copy_(shadow[f"{i}"].to(p.device))
            ema.optimization_step = int(state["ema"]["optimization_step"])
        run.global_step = int(state["global_step"])
        run.losses = [tuple(x) for x in state.get("losses", [])]
        check_resume_settings(in_dir, state.get("resume_key", {}), run.resume_key, cfg.allow_changed_settings, main)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    ckpt_root = output_dir / "checkpoints"
    if main:
        remove_partial(ckpt_root)
    accelerator.wait_for_everyone()
    # Verified (sizes and SHA-256) once, on the main process, which also warns about a damaged newest checkpoint.
    resume = _on_main(accelerator, lambda: resolve_resume(cfg.resume_from_checkpoint, ckpt_root))
    if resume is not None:
        try:
            accelerator.load_state(str(resume))
        except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
            raise ValueError(f"Checkpoint {resume} could not be read: {err}") from None
        say(f"resumed from {resume} at step {run.global_step}")
    elif cfg.resume_from_checkpoint == "latest":
        say(f"no checkpoint in {ckpt_root} yet: starting a new run")

    if trackers:
        accelerator.init_trackers(cfg.tracker_project_name, config=_hparams(cfg))
    pairs = validation_pairs(cfg.validation_prompt, cfg.validation_image)
    if flow:
        length = cfg.max_sequence_length
        prompts = TransformerPromptEncoder(base, device, weight_dtype, cfg.text_embedding_cache, length)
    else:
        prompts = PromptEncoder(base, device, weight_dtype, cfg.text_embedding_cache)
    noise_scheduler = base.noise_scheduler
    sf = base.vae.config.scaling_factor
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    num_t = noise_scheduler.config.num_train_timesteps
    ema_params = trained_params

    def loss_for(batch: dict, step: int, micro: int) -> torch.Tensor:
        pixels = batch["pixel_values"].to(device=device, dtype=base.vae.dtype)
        bsz = pixels.shape[0]
        gens = sample_generators(cfg.seed, step, micro, accelerator.process_index * cfg.train_batch_size, bsz)
        with torch.no_grad():
            dist = base.vae.encode(pixels).latent_dist
            latents = dist.mean + dist.std * randn(tuple(dist.mean.shape[1:]), gens, device, dist.mean.dtype)
            latents = ((latents - shift) * sf).to(weight_dtype)
        if flow:
            return flow_matching_step(model, base, *flow, prompts, batch, latents, gens)
        noise = randn(tuple(latents.shape[1:]), gens, device, latents.dtype)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * randn((latents.shape[1], 1, 1), gens, device, latents.dtype)
        timesteps = torch.stack([torch.randint(0, num_t, (), generator=g) for g in gens]).to(device)
        noisy, target = ddpm_inputs(noise_scheduler, latents, noise, timesteps, prediction_type)
        embeds, pooled = prompts(batch["captions"])
        added = fam.added_conditioning(pooled, batch["time_ids"].to(device=device, dtype=weight_dtype))
        pred = model(noisy, timesteps, encoder_hidden_states=embeds, condition=batch["conditioning"].to(device),
                     added_cond_kwargs=added)  # fmt: skip
        return ddpm_loss(pred, target, noise_scheduler, timesteps, prediction_type, cfg.snr_gamma)

    # ---- loop
    say(
        f"training {max_steps} steps ({num_epochs} epochs of {updates_per_epoch} steps); batch "
        f"{cfg.train_batch_size} x {procs} process(es) x {cfg.gradient_accumulation_steps} accumulation"
    )
    first_epoch = run.global_step // updates_per_epoch
    skip_batches = (run.global_step % updates_per_epoch) * cfg.gradient_accumulation_steps
    bad_rows: list[tuple[str, str]] = []
    progress = tqdm(total=max_steps, initial=run.global_step, desc="train", unit="step", disable=not main)
    new_losses: list[float] = []
    last_checkpoint = resumed_step = run.global_step if resume is not None else -1

    def last_good() -> str | None:
        """The newest checkpoint this run can go back to (named in the error when training diverges)."""
        if last_checkpoint < 0:
            return None
        return str(resume if last_checkpoint == resumed_step else ckpt_root / f"checkpoint-{last_checkpoint}")

    def trained_named() -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    t0 = time.time()
    done = run.global_step >= max_steps
    stop_at = max_steps if cfg.exit_after_steps is None else min(max_steps, run.global_step + cfg.exit_after_steps)
    try:
        for epoch in range(first_epoch, num_epochs):
            if done:
                break
            batches = loader
            if epoch == first_epoch and skip_batches:
                batches = accelerator.skip_first_batches(loader, skip_batches)
            # accelerate's loader re-sets its sampler's epoch to its own iteration count when iterated; align both.
            batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            micro, loss_sum = 0, 0.0
            for batch in batches:
                bad_rows.extend(batch["bad_rows"])
                with accelerator.accumulate(model):
                    loss = loss_for(batch, run.global_step, micro)
                    check_loss(loss, run.global_step + 1, last_good())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trained_params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += accelerator.reduce(loss.detach(), reduction="mean").item()
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                step_loss = loss_sum / micro
                micro, loss_sum = 0, 0.0
                run.global_step += 1
                if ema is not None:
                    ema.step(ema_params)
                run.losses.append((run.global_step, step_loss))
                del run.losses[:-LOSS_HISTORY]
                new_losses.append(step_loss)
                lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if trackers and run.global_step % cfg.logging_steps == 0:
                    accelerator.log({"loss": step_loss, **lrs}, step=run.global_step)
                if run.global_step % cfg.checkpointing_steps == 0:
                    check_weights(trained_named(), run.global_step, last_good())
                    save_checkpoint(accelerator, ckpt_root, run.global_step, cfg.checkpoints_total_limit)
                    last_checkpoint = run.global_step
                if pairs and main and run.global_step % cfg.validation_steps == 0:
                    _validate(
                        cfg,
                        base,
                        accelerator,
                        model,
                        ema,
                        ema_params,
                        pairs,
                        resolution,
                        run.global_step,
                        output_dir,
                        device,
                        weight_dtype,
                    )
                if run.global_step >= stop_at:
                    done = True
                    break
    finally:
        progress.close()
    elapsed = time.time() - t0

    # ---- finish
    if last_checkpoint != run.global_step:
        check_weights(trained_named(), run.global_step, last_good())
        save_checkpoint(accelerator, ckpt_root, run.global_step, cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).release()
    raw_unet = accelerator.unwrap_model(model).backbone
    raw_control = accelerator.unwrap_model(model).controlnext
    prints = gather_object([fingerprint(trainable_state())])
    if run.global_step < max_steps:  # --exit-after-steps: leave the checkpoint, export nothing yet
        say(f"stopped at step {run.global_step} of {max_steps}; continue with --resume-from-checkpoint latest")
        accelerator.end_training()
        return TrainResult(
            output_dir=output_dir,
            global_step=run.global_step,
            losses=new_losses,
            controlnext=raw_control,
            unet=raw_unet,
            trainable=trainable,
            rank_fingerprints=prints,
        )
    all_bad = gather_object(bad_rows) if procs > 1 else bad_rows
    load_bad = sorted(set(map(tuple, all_bad)))
    if ema is not None:
        ema.copy_to(ema_params)  # export the averaged weights
    # Full trained tensors on the main process (a collective under FSDP / DeepSpeed ZeRO-3, which shard them).
    final_state = accelerator.get_state_dict(model) if sharded else trainable_state()
    if pairs and main and (ema is not None or run.global_step % cfg.validation_steps):
        # Final images (of the EMA weights, when used) unless the last step was just validated.
        _validate(
            cfg,
            base,
            accelerator,
            model,
            None,
            ema_params,
            pairs,
            resolution,
            run.global_step,
            output_dir,
            device,
            weight_dtype,
        )
    files: dict[str, str] = {}
    if main:
        final_state = {k: v.detach().to("cpu", torch.float32) for k, v in final_state.items() if k in trainable_keys}
        check_weights(final_state.items(), run.global_step, last_good())  # the EMA average too
        files = export_outputs(output_dir, raw_control.config, final_state, base_values, cfg.save_unet_as)
        if len(set(prints)) > 1 and not sharded:
            log.warning("The processes ended with different weights: %s", prints)
        window = [v for _, v in run.losses[-50:]]
        final_loss = float(np.mean(window)) if window else float("nan")
        reported_bad = scan.bad + [b for b in load_bad if b not in set(scan.bad)]
        summary = dict(
            steps=run.global_step,
            epochs=run.global_step / updates_per_epoch,
            final_loss=final_loss,
            seconds=elapsed,
            rows=len(scan.good),
            bad_rows=[list(b) for b in reported_bad],
            trainable=dict(
                control=trainable.control_trainable,
                unet=trainable.unet_trainable,
                unet_frozen=trainable.unet_frozen,
                unet_tensors=len(unet_names),
            ),
            rank_fingerprints=prints,
            files=files,
            config=cfg.to_dict(),
        )
        write_text_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=1) + "\n")
        files["train_summary.json"] = "steps, losses, bad rows, trainable counts, per-process weight hashes"
        settings = {
            "family / variant": f"{family} / {raw_control.config.variant}",
            "control injection": cfg.control_injection,
            "resolution": resolution,
            "batch": f"{cfg.train_batch_size} per device x {procs} processes x "
            f"{cfg.gradient_accumulation_steps} accumulation",
            "learning rates": f"control {groups[0]['lr']:g}, UNet {cfg.unet_learning_rate * scale:g} "
            f"({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps})",
            "trained UNet parameters": f"{trainable.unet_trainable:,} in {len(unet_names)} tensors, "
            f"patterns `{patterns}`",
            "control module parameters": f"{trainable.control_trainable:,}",
            "mixed precision": accelerator.mixed_precision,
            "prediction type": prediction_type,
            "caption dropout": cfg.caption_dropout,
            "EMA": f"decay {cfg.ema_decay}" if cfg.use_ema else "no",
            "min-SNR gamma": cfg.snr_gamma or "no",
            "noise offset": cfg.noise_offset,
            "seed": cfg.seed,
        }
        if flow:  # the DDPM rows do not apply
            for key in ("prediction type", "min-SNR gamma", "noise offset"):
                del settings[key]
            settings.update(flow_settings(*flow, prompts))
        write_model_card(
            output_dir,
            dict(
                base_model=cfg.pretrained_model,
                family=family,
                variant=raw_control.config.variant,
                control_injection=cfg.control_injection,
                steps=run.global_step,
                epochs=run.global_step / updates_per_epoch,
                dataset=cfg.dataset,
                rows=len(scan.good),
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
        print(f"done: {run.global_step} steps in {elapsed:.1f} s; outputs in {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        global_step=run.global_step,
        losses=new_losses,
        controlnext=raw_control,
        unet=raw_unet,
        trainable=trainable,
        bad_rows=load_bad,
        rank_fingerprints=prints,
        files=files,
    )


def _validate(
    cfg, base, accelerator, model, ema, ema_params, pairs, resolution, step, output_dir, device, dtype
) -> None:
    model = accelerator.unwrap_model(model)
    model.release()  # the pipeline attaches the module itself
    if ema is not None:  # validate the averaged weights, then put the raw ones back
        ema.store(ema_params)
        ema.copy_to(ema_params)
    try:
        trackers = [t for t in accelerator.trackers]
        path = run_validation(
            base=base,
            unet=model.backbone,
            controlnext=model.controlnext,
            pairs=pairs,
            resolution=resolution,
            step=step,
            out_dir=output_dir / "validation",
            trackers=trackers,
            device=device,
            dtype=dtype,
            seed=cfg.seed,
            num_images=cfg.num_validation_images,
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
        )
        if path is not None:
            log.info("validation images: %s", path)
    finally:
        if ema is not None:
            ema.restore(ema_params)
