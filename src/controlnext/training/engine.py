"""The one training core of ``controlnext train`` and ``controlnext train-video``.

A command builds its models (a :class:`~controlnext.training.core.ControlledBackbone`), its data and its loss;
:class:`Trainer` does everything else, the same way for both:

- the accelerator (:func:`make_accelerator`; CPU processes form a gloo group, and FSDP2 runs over it),
- the optimizer and the LR schedule (:func:`make_optimizer`, :func:`make_lr_scheduler`), ``accelerator.prepare``,
- resume from the newest intact checkpoint (:meth:`Trainer.resume`) under the one resume rule,
- the accumulate-step loop (:meth:`Trainer.run`): gradient clipping, the NaN/inf guard, EMA, progress and tracker
  logging, a checkpoint every N steps and a per-step callback (validation), ``--exit-after-steps``, ``--profile``,
- the last checkpoint (:meth:`Trainer.finish`) and the trained tensors for export (:meth:`Trainer.final_state`).

The objective is the command's: :meth:`Trainer.run` takes ``loss(model, batch, step, micro) -> scalar tensor``
(DDPM epsilon / v for the image UNets, EDM for SVD, flow matching for the DiT families: see ``objectives.py``), and
the command draws its own per-sample generators in it (:func:`~controlnext.training.core.sample_generators`), so the
core adds no random draw of its own.

One checkpoint scheme (inside each atomic ``checkpoint-N`` folder of :mod:`~controlnext.training.checkpoint`):
accelerate's state (optimizer, LR scheduler, RNG; under FSDP / DeepSpeed also their sharded model),
``trainable.safetensors`` (the trained tensors only: the frozen backbone is never written, except inside the
engines' sharded model), ``ema.safetensors`` (with EMA), ``train_state.json`` (step, recent losses, the resume key,
the config), ``data_state.rank{R}.json`` per process (see below) and the manifest.

**Data-position protocol** (for streaming datasets). ``TrainData.dataset`` may be any object; the core uses what
it has of:

- ``set_epoch(epoch: int)``: called at the start of every epoch, before its first batch is drawn;
- ``state_dict() -> dict``: called on every process when a checkpoint is written, after the batches of the
  checkpointed step were consumed; the JSON-able result is stored as ``data_state.rank{R}.json`` (R: the process
  index) in the checkpoint folder, written and hashed with the rest (so it is atomic with the weights);
- ``load_state_dict(state: dict)``: on resume, each process gets its own saved state, after ``set_epoch`` of the
  resumed epoch and before its first batch. The core then does not skip batches itself (``TrainData.batches``
  gets ``skip=0``): the dataset is already at its position. Without a saved state (an older checkpoint, another
  process count) the core falls back to skipping ``skip`` micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    MANIFEST,
    check_resume_settings,
    lock_output_dir,
    remove_partial,
    resolve_resume,
    save_checkpoint,
)
from .core import ControlledBackbone
from .guards import check_loss, check_mixed_precision, check_weights

__all__ = [
    "EMA_FILE",
    "STATE_FILE",
    "TRAINABLE_FILE",
    "LoopSettings",
    "Profile",
    "TrainData",
    "Trainer",
    "format_profile",
    "frozen_loading",
    "has_accelerator",
    "is_sharded",
    "make_accelerator",
    "make_lr_scheduler",
    "make_optimizer",
    "on_main",
    "peak_memory",
    "release_accelerate_state",
]

log = logging.getLogger("controlnext.train")

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
DATA_STATE = "data_state.rank{rank}.json"
LOSS_HISTORY = 1000  # steps of loss kept in checkpoints (for the model card's final loss after a resume)
Loss = Callable[[nn.Module, Any, int, int], torch.Tensor]


# ------------------------------------------------------------------------------------------------ accelerator
def has_accelerator() -> bool:
    """True when torch sees a GPU (CUDA), an XPU or Apple's MPS."""
    # Without one, processes started by `accelerate launch --multi_gpu` / torchrun must form a CPU (gloo) group:
    # accelerate only does so when told to use the CPU.
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def make_accelerator(
    output_dir: str | Path,
    *,
    cpu: bool = False,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    trackers: list[str] | None = None,
):
    """The run's ``Accelerator``: on the CPU when asked or when there is no GPU; logs under ``OUTPUT/logs``.

    accelerate runs FSDP only on GPUs; FSDP2 (``fully_shard`` on DTensors) also runs on CPU processes over gloo,
    so a CPU launch with ``--use_fsdp --fsdp_version 2`` (or an FSDP2 config file) trains sharded through the
    same accelerate code as on GPUs. FSDP1 and DeepSpeed need accelerators (DeepSpeed: see docs/training.md).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env

    output_dir = Path(output_dir)
    on_cpu = cpu or not has_accelerator()
    handlers = []
    if on_cpu and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        # accelerate turns DeepSpeed off when told to use the CPU; DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu)
        # runs it over gloo when the process group is gloo (without oneCCL's torch bindings).
        on_cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=handlers,
    )
    _fsdp2_over_gloo(accelerator)
    check_mixed_precision(accelerator)
    return accelerator


def _fsdp2_over_gloo(accelerator) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* environment, as accelerate does
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on CPU processes needs fsdp_version 2 (fully_shard); FSDP1 runs on GPUs only. Launch with "
            "--fsdp_version 2 or use an FSDP2 config (configs/accelerate/fsdp.yaml)."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP


@contextlib.contextmanager
def frozen_loading(accelerator):
    """A context for loading the frozen base under DeepSpeed ZeRO-3: transformers partitions every model it loads
    while a ZeRO-3 config is registered, and a model outside the DeepSpeed engine is never gathered again."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or int(plugin.zero_stage or 0) != 3:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def release_accelerate_state() -> None:
    """Let a later run in this (single) process use other accelerate settings, e.g. mixed precision."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return  # a distributed launch: the process group belongs to the launcher
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def on_main(accelerator, work: Callable[[], Any]) -> Any:
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


def is_sharded(accelerator) -> bool:
    """True when parameters are sharded across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


# ------------------------------------------------------------------------------------------------ optimisation
def make_optimizer(
    groups: list[dict],
    *,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the parameter groups (each with its learning rate), or bitsandbytes' 8-bit AdamW."""
    kwargs = dict(betas=betas, weight_decay=weight_decay, eps=eps)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes.") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    num_processes: int,
    num_cycles: int = 1,
    power: float = 1.0,
):
    """A diffusers schedule over ``max_steps`` optimisation steps."""
    from diffusers.optimization import get_scheduler

    # The prepared scheduler steps once per process per update (accelerate's convention), hence the `* processes`.
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=num_cycles,
        power=power,
    )


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class LoopSettings:
    """How the loop runs: steps, accumulation, clipping (0/None: off), checkpoints, logging, early exits."""

    max_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    checkpointing_steps: int | None = None  # None: only the last step's checkpoint
    checkpoints_total_limit: int | None = None
    logging_steps: int = 0  # tracker logging every N steps (0: off)
    exit_after_steps: int | None = None  # stop after N steps of this invocation (a checkpoint is left)
    profile_steps: int | None = None  # measure N steps, report, stop (no checkpoint)
    description: str = "train"


@dataclass
class TrainData:
    """The data as the loop sees it.

    ``batches(epoch, skip)`` returns this process's micro-batches of ``epoch`` (the batches an accelerate-prepared
    loader shards, or a sampler that splits global batches itself) without their first ``skip`` micro-batches (a
    resume mid-epoch). ``updates_per_epoch``: optimisation steps per epoch (a loader that covers every remaining
    step at once gives ``max_steps`` and is one epoch). ``dataset``: the object of the data-position protocol (see
    the module docstring), or None.
    """

    batches: Callable[[int, int], Iterable[Any]]
    updates_per_epoch: int
    dataset: Any = None


@dataclass
class Profile:
    """``--profile``: per optimisation step, its wall time, the part spent waiting for batches, its samples."""

    step_seconds: list[float] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    def add(self, seconds: float, waited: float, samples: int) -> None:
        self.step_seconds.append(seconds)
        self.wait_seconds.append(waited)
        self.samples.append(samples)

    def summary(self, device: torch.device) -> dict:
        """This process's rates and peak memory; the first step (one-time start-up: workers, allocator) is left
        out when there are others."""
        first = 1 if len(self.step_seconds) > 1 else 0
        secs, waits, samples = self.step_seconds[first:], self.wait_seconds[first:], self.samples[first:]
        shares = [w / t for w, t in zip(waits, secs) if t > 0]
        return dict(
            steps_measured=len(secs),
            samples_per_second=sum(samples) / sum(secs) if sum(secs) > 0 else 0.0,
            step_ms=1000 * sum(secs) / max(1, len(secs)),
            data_wait_share=sum(waits) / sum(secs) if sum(secs) > 0 else 0.0,
            data_wait_share_max=max(shares, default=0.0),
            **peak_memory(device),
            step_seconds=self.step_seconds,
            wait_seconds=self.wait_seconds,
        )


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's ``max_memory_allocated``, else the peak resident set size (RSS)."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "memory": "cuda allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mib": float("nan"), "memory": "unknown"}
    return {"peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "RSS"}


def format_profile(rows: list[dict]) -> str:
    """The ``--profile`` table: one line per process."""
    lines = [
        f"profile: {rows[0]['steps_measured']} steps measured per process (the first step, start-up, left out)",
        "process | samples/s | step ms | data wait (mean / max share of a step) | peak memory",
    ]
    for rank, r in enumerate(rows):
        lines.append(
            f"{rank} | {r['samples_per_second']:.1f} | {r['step_ms']:.1f} | {100 * r['data_wait_share']:.1f} % / "
            f"{100 * r['data_wait_share_max']:.1f} % | {r['peak_memory_mib']:.0f} MiB ({r['memory']})"
        )
    return "\n".join(lines)


@dataclass
class TrainState:
    global_step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), the last LOSS_HISTORY


class Trainer:
    """The shared core: prepares, resumes, runs the accumulate-step loop and checkpoints (call on every process).

    ``model`` is the command's :class:`ControlledBackbone` (not yet prepared); ``backbone_names`` the trained
    backbone parameters (the whole control module is trained); ``resume_key`` the settings that decide the data
    order (a changed one refuses the resume unless ``allow_changed_settings``); ``config`` is stored in each
    checkpoint. ``loader``, when given, is prepared with the model (accelerate shards its batches);
    ``batch_size`` (per process) is what DeepSpeed's config is told when the loader's batches come from a sampler.
    """

    def __init__(
        self,
        accelerator,
        model: ControlledBackbone,
        backbone_names: list[str],
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        settings: LoopSettings,
        *,
        output_dir: str | Path,
        resume_key: dict,
        config: dict | None = None,
        allow_changed_settings: bool = False,
        ema_decay: float | None = None,
        loader=None,
        batch_size: int | None = None,
    ):
        self.accelerator = accelerator
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.main = accelerator.is_main_process
        self.raw = model
        self.backbone_names = list(backbone_names)
        self.resume_key = dict(resume_key)
        self.config = config or {}
        self.allow_changed_settings = allow_changed_settings
        self.state = TrainState()
        self.new_losses: list[float] = []  # this invocation's
        self.resumed_from: Path | None = None
        self.resumed_step = -1
        self.last_checkpoint = -1
        self.profile: Profile | None = None
        self.seconds = 0.0
        self._data_state: dict | None = None  # this process's saved data position, until the loop applies it
        self._dataset: Any = None  # TrainData.dataset of the running loop (asked for its position at checkpoints)
        self._prefix = model._denoiser
        self.trainable_keys = [f"controlnext.{k}" for k in model.controlnext.state_dict()] + [
            f"{self._prefix}.{n}" for n in self.backbone_names
        ]

        _tell_deepspeed(accelerator, batch_size)
        prepared = accelerator.prepare(model, optimizer, *([] if loader is None else [loader]), lr_scheduler)
        self.model, self.optimizer = prepared[0], prepared[1]
        self.loader = prepared[2] if loader is not None else None
        self.lr_scheduler = prepared[-1]
        # After prepare: FSDP2 replaces the parameters (DTensors) and points the optimizer at the new ones.
        self.trained_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.sharded = is_sharded(accelerator)
        _check_control_unit(self.raw)
        self.ema = None
        if ema_decay is not None:
            if self.sharded:
                raise ValueError(
                    "--use-ema is not supported with FSDP or DeepSpeed ZeRO-3 (sharded weights); use DDP/ZeRO-1/2."
                )
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trained_params, decay=ema_decay)
            self.ema.to(accelerator.device)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # ---- the trained tensors
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full float32 CPU copies of the trained tensors, ``controlnext.*`` and ``<backbone>.*`` (a collective
        under FSDP2, whose parameters are DTensors: call on every process)."""
        sd = {f"controlnext.{k}": v for k, v in self.raw.controlnext.state_dict().items()}
        params = dict(self.raw.backbone.named_parameters())
        sd.update({f"{self._prefix}.{n}": params[n] for n in self.backbone_names})
        return {k: _full(v).detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    def trained_named(self) -> list[tuple[str, torch.Tensor]]:
        """The trained parameters; with sharded weights, this process's shards."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [(n, _local(p)) for n, p in named] if self.sharded else named

    def final_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors to export (float32, CPU), complete on the main process. Call on every process:
        under FSDP / DeepSpeed ZeRO-3 the full tensors are gathered."""
        state = self.accelerator.get_state_dict(self.model) if self.sharded else self.trainable_state()
        if not self.main:
            return {}
        return {k: v.detach().to("cpu", torch.float32) for k, v in state.items() if k in set(self.trainable_keys)}

    def _gather_names(self):
        """Under sharding, every process's non-finite findings are collected (see ``check_weights``)."""
        if not self.sharded or self.accelerator.num_processes == 1:
            return None
        from accelerate.utils import gather_object

        return gather_object

    def last_good(self) -> str | None:
        """The newest checkpoint this run can go back to (named in the error when training diverges)."""
        if self.last_checkpoint < 0:
            return None
        if self.last_checkpoint == self.resumed_step:
            return str(self.resumed_from)
        return str(self.checkpoints / f"checkpoint-{self.last_checkpoint}")

    # ---- checkpoints
    def _save_hook(self, models, weights, out_dir) -> None:
        out = Path(out_dir)
        dataset_state = getattr(self._dataset, "state_dict", None)
        if callable(dataset_state):  # every process writes its own position
            text = json.dumps(dataset_state(), sort_keys=True)
            (out / DATA_STATE.format(rank=self.accelerator.process_index)).write_text(text)
        trainable = bool(weights)  # empty under DeepSpeed / FSDP: accelerate saved their (sharded) model itself
        if trainable:
            weights.pop()  # the full backbone is frozen: store only what is trained
        if not self.main:
            return
        if trainable:
            save_file(self.trainable_state(), str(out / TRAINABLE_FILE), metadata={"format": "pt"})
        ema = self.ema
        if ema is not None:
            tensors = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}
            save_file(tensors, str(out / EMA_FILE))
        state = dict(
            global_step=self.state.global_step,
            losses=self.state.losses[-LOSS_HISTORY:],
            resume_key=self.resume_key,
            ema=None if ema is None else dict(optimization_step=ema.optimization_step, decay=ema.decay),
            config=self.config,
        )
        (out / STATE_FILE).write_text(json.dumps(state, indent=1))

    def _load_hook(self, models, in_dir) -> None:
        in_dir = Path(in_dir)
        # Checkpoints of train-video before the shared core: the whole model in accelerate's file, the state in
        # the manifest; accelerate then loads the model itself.
        legacy = not (in_dir / STATE_FILE).is_file()
        if models and not legacy:
            models.pop()
            sd = _read_checkpoint_file(in_dir, TRAINABLE_FILE)
            missing = sorted(set(self.trainable_keys) - set(sd))
            unexpected = sorted(set(sd) - set(self.trainable_keys))
            if missing or unexpected:
                raise ValueError(
                    f"Checkpoint {in_dir} was written for a different trainable set (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}): resume with the same --train-unet and control module settings."
                )
            prefix = "controlnext."
            self.raw.controlnext.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
            params = dict(self.raw.backbone.named_parameters())
            with torch.no_grad():
                for n in self.backbone_names:
                    params[n].copy_(sd[f"{self._prefix}.{n}"])
        state = json.loads((in_dir / (MANIFEST if legacy else STATE_FILE)).read_text())
        if self.ema is not None:
            if not (in_dir / EMA_FILE).is_file():
                raise ValueError(f"Checkpoint {in_dir} has no EMA weights but --use-ema was given.")
            shadow = _read_checkpoint_file(in_dir, EMA_FILE)
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(shadow[f"{i}"].to(p.device))
            self.ema.optimization_step = int(state["ema"]["optimization_step"])
        step = int(state["step" if legacy else "global_step"])
        losses = state.get("losses", [])
        self.state.global_step = step
        self.state.losses = [(step - len(losses) + 1 + i, x) for i, x in enumerate(losses)] if legacy else [
            tuple(x) for x in losses
        ]
        check_resume_settings(
            in_dir, state.get("resume_key", {}), self.resume_key, self.allow_changed_settings, self.main
        )
        data_file = in_dir / DATA_STATE.format(rank=self.accelerator.process_index)
        self._data_state = json.loads(data_file.read_text()) if data_file.is_file() else None

    def resume(self, spec: str | None) -> Path | None:
        """``--resume-from-checkpoint``: ``latest`` (fresh start when there is none yet), a checkpoint folder or a
        run folder; verified (sizes, SHA-256) once, on the main process. Returns the checkpoint used, or None."""
        accelerator = self.accelerator
        if self.main:
            remove_partial(self.checkpoints)
        accelerator.wait_for_everyone()
        found = on_main(accelerator, lambda: resolve_resume(spec, self.checkpoints))
        if found is None:
            if spec == "latest":
                self._say(f"no checkpoint in {self.checkpoints} yet: starting a new run")
            return None
        try:
            accelerator.load_state(str(found))
        except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
            raise ValueError(f"Checkpoint {found} could not be read: {err}") from None
        self.resumed_from = found
        self.resumed_step = self.last_checkpoint = self.state.global_step
        self._say(f"resumed from {found} at step {self.state.global_step}")
        return found

    def save(self) -> Path:
        """Check the trained tensors (no NaN/inf is ever written), then write ``checkpoint-<step>``."""
        step = self.state.global_step
        check_weights(self.trained_named(), step, self.last_good(), self._gather_names())
        path = save_checkpoint(self.accelerator, self.checkpoints, step, self.settings.checkpoints_total_limit)
        self.last_checkpoint = step
        return path

    # ---- the loop
    def _position(self, dataset, epoch: int, first: bool) -> bool:
        """Data-position protocol at the start of ``epoch``; True when the dataset restored a saved position."""
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        load = getattr(dataset, "load_state_dict", None)
        if first and self._data_state is not None and callable(load):
            load(self._data_state)
            return True
        return False

    def run(self, data: TrainData, loss: Loss, on_step: Callable[[int], None] | None = None) -> None:
        """Train until ``max_steps`` (or ``exit_after_steps`` / ``profile_steps`` of this invocation).

        For every micro-batch: ``loss(model, batch, global_step, micro)`` (``micro`` counts the micro-batches of
        the current optimisation step, from 0), the NaN/inf guard, backward, clipping and the optimizer step under
        ``accelerator.accumulate``. After every optimisation step: EMA, logging, the checkpoint every
        ``checkpointing_steps``, then ``on_step(global_step)``.
        """
        acc, s, st = self.accelerator, self.settings, self.state
        self._dataset = data.dataset
        upe = max(1, data.updates_per_epoch)
        num_epochs = math.ceil(s.max_steps / upe)
        first_epoch = st.global_step // upe
        skip = (st.global_step % upe) * s.gradient_accumulation_steps
        stop_at = s.max_steps
        for limit in (s.exit_after_steps, s.profile_steps):
            if limit is not None:
                stop_at = min(stop_at, st.global_step + limit)
        if s.profile_steps is not None:
            self.profile = Profile()
        progress = tqdm(total=s.max_steps, initial=st.global_step, desc=s.description, unit="step",
                        disable=not self.main)  # fmt: skip
        done = st.global_step >= s.max_steps
        t0 = time.perf_counter()
        try:
            for epoch in range(first_epoch, num_epochs):
                if done:
                    break
                restored = self._position(data.dataset, epoch, epoch == first_epoch)
                batches = iter(data.batches(epoch, skip if epoch == first_epoch and not restored else 0))
                micro, loss_sum, samples, waited = 0, 0.0, 0, 0.0
                step_start = time.perf_counter()
                while True:
                    fetch = time.perf_counter()
                    batch = next(batches, _END)
                    waited += time.perf_counter() - fetch
                    if batch is _END:
                        break
                    with acc.accumulate(self.model):
                        value = loss(self.model, batch, st.global_step, micro)
                        check_loss(value, st.global_step + 1, self.last_good())
                        acc.backward(value)
                        if acc.sync_gradients and s.max_grad_norm:
                            acc.clip_grad_norm_(self.trained_params, s.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    loss_sum += acc.reduce(value.detach(), reduction="mean").item()
                    micro += 1
                    samples += _batch_size(batch)
                    if not acc.sync_gradients:
                        continue
                    step_loss = loss_sum / micro
                    st.global_step += 1
                    if self.profile is not None:
                        self.profile.add(time.perf_counter() - step_start, waited, samples)
                    micro, loss_sum, samples, waited = 0, 0.0, 0, 0.0
                    self._after_step(step_loss, progress, on_step)
                    if st.global_step >= stop_at:
                        done = True
                        break
                    step_start = time.perf_counter()
        finally:
            progress.close()
        self.seconds = time.perf_counter() - t0

    def _after_step(self, step_loss: float, progress, on_step) -> None:
        acc, s, st = self.accelerator, self.settings, self.state
        if self.ema is not None:
            self.ema.step(self.trained_params)
        st.losses.append((st.global_step, step_loss))
        del st.losses[:-LOSS_HISTORY]
        self.new_losses.append(step_loss)
        lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        if s.logging_steps and acc.trackers and st.global_step % s.logging_steps == 0:
            acc.log({"loss": step_loss, **lrs}, step=st.global_step)
        if self.profile is None and s.checkpointing_steps and st.global_step % s.checkpointing_steps == 0:
            self.save()
        if on_step is not None:
            on_step(st.global_step)

    def profile_report(self) -> list[dict]:
        """``--profile``: every process's :meth:`Profile.summary`, gathered; printed and written to
        ``OUTPUT/profile.json`` by the main process (call on every process)."""
        from accelerate.utils import gather_object

        rows = gather_object([self.profile.summary(self.accelerator.device)])
        if self.main:
            print(format_profile(rows))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
        return rows

    def finish(self) -> None:
        """The last step's checkpoint (unless it was just written; none after ``--profile``)."""
        if self.profile is None and self.last_checkpoint != self.state.global_step:
            self.save()
        self.accelerator.wait_for_everyone()

    def _say(self, text: str) -> None:
        if self.main:
            print(text)


_END = object()


def _tell_deepspeed(accelerator, batch_size: int | None) -> None:
    """DeepSpeed needs the per-process micro-batch size; a loader with a batch sampler has no ``batch_size``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or batch_size is None:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size


def _check_control_unit(model: ControlledBackbone) -> None:
    """The control module runs inside the backbone's call, through its own methods: FSDP must keep it in the outer
    unit (an FSDP unit inside it would never be all-gathered)."""
    inner = [name for name, m in model.controlnext.named_modules() if name and type(m).__name__.startswith("FSDP")]
    if inner:
        raise ValueError(
            f"FSDP wrapped parts of the control module ({inner[:3]}): name only backbone classes in "
            "fsdp_transformer_layer_cls_to_wrap (e.g. CrossAttnDownBlock2D,UpBlock2D; the control module also "
            "uses ResnetBlock2D), or use the policy of configs/accelerate/fsdp.yaml."
        )


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return 0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameter) gathered to its full value; any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded parameter (FSDP2's DTensor, DeepSpeed ZeRO-3's partition)."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        return to_local()
    return getattr(t, "ds_tensor", t)


def _read_checkpoint_file(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file; a damaged file (not caught by an older, size-only manifest) is one error."""
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Checkpoint {folder}: {name} is damaged ({err}).") from None


@contextlib.contextmanager
def output_lock(accelerator, output_dir: str | Path):
    """One run per output folder: the main process holds its lock for the block (see ``lock_output_dir``)."""
    with lock_output_dir(output_dir) if accelerator.is_main_process else contextlib.nullcontext():
        yield
