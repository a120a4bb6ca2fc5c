"""Inference benchmark: ControlNeXt vs the base UNet and diffusers ControlNet, side by side in one run.

What one run measures, per row (a model combination) and per guidance mode (UNet batch 1, or 2 with classifier-free
guidance), at the real architecture sizes with randomly initialised weights (nothing is downloaded):

* ``step_seconds``: wall time of one denoising step's model calls (median over the timed steps; on CUDA timed with
  CUDA events, i.e. on the GPU's own clock from the step's first launch to its last kernel), with
  ``overhead`` = the median, over rounds, of (row / base with the same guidance in the same round) - 1. Rows are
  interleaved round-robin (rotating the order every round), so load from other processes hits all rows alike;
* ``step_cpu_seconds`` / ``cpu_overhead``: the same with process CPU time, which other processes disturb less;
* ``control_cpu_seconds`` / ``control_share`` (CPU runs): CPU time spent inside the control path itself (the
  adapter's hooks, timed by clock hooks placed around them; ControlNet's forward call), and its share of the base step;
* ``flops_per_step`` (``torch.utils.flop_counter.FlopCounterMode``, attention included) and ``prepare_flops`` (the
  once-per-generation work, e.g. ControlNeXt's cached timestep-independent prefix), counted once in an untimed step;
* ``peak_mem_bytes``: the weights of every model the row uses plus the peak of bytes newly allocated from the start of
  a generation (attaching, encoding the prefix, duplicating conditions) to the end of a step. CUDA: from
  ``torch.cuda.max_memory_allocated``; CPU: from the profiler's allocation events (``tracemalloc`` cannot see torch's
  allocator and RSS deltas are blurred by the system allocator), i.e. the CPU analogue of ``max_memory_allocated``.
  Measured in its own untimed step (the FLOP counter's dispatch mode would turn in-place ops into copies);
* ``added_params`` / ``trainable_params``: parameters added to the base, and those trained by the published recipe
  (the module plus the UNet subset it fine-tunes; all of ControlNet).

Rows: ``base`` (the UNet alone), ``controlnext`` (the 3.5M-parameter layout of the family: ``sd15-training`` or
``sdxl``, through :func:`controlnext.attach` with the cached prefix and guidance de-duplication, as the pipelines use
it), ``controlnext-sd15-release`` (the 5.35M ``sd15`` release layout), ``controlnet``
(``ControlNetModel.from_unet(unet)``, called as diffusers' pipelines do: ControlNet, then the UNet with its residuals,
the condition duplicated for guidance). Use :func:`run_benchmark` or ``controlnext bench``.

With ``compile`` set (a ``torch.compile`` backend, e.g. ``inductor``), each row is compiled with its hooks in place and
timed on its own, rows one after the other: dynamo does not guard on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph compiled for one row would silently be reused by a
row with different hooks; the compiled code is reset between rows. ``compile_seconds``
is the time of the first call and the warm-up calls (where compiling and the one expected recompilation happen) minus
as many steady steps; a recompilation during the timed steps is an error (the timing would include compiling).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench_presets import (
    PRESETS,
    ROW_NAMES,
    SCHEDULE_STEPS,
    TEXT_TOKENS,
    Preset,
)
from .families import get_family
from .inject import ControlNeXtAdapter, attach
from .models.controlnext import ControlNeXtModel

__all__ = [
    "PRESETS",
    "ROW_NAMES",
    "BenchConfig",
    "BenchResult",
    "Preset",
    "RowResult",
    "StepClock",
    "build_controlnet",
    "build_controlnext",
    "build_random",
    "build_unet",
    "make_inputs",
    "peak_new_bytes",
    "render_markdown",
    "render_table",
    "run_benchmark",
    "update_docs",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    """Everything that defines one benchmark run (see ``controlnext bench --help``)."""

    preset: str = "sd15-512"
    resolution: int | None = None  # default: the preset's
    rows: tuple[str, ...] | None = None  # default: the preset's
    guidance: tuple[bool, ...] = (False, True)  # run each row without and with classifier-free guidance
    repeats: int | None = None  # timed rounds (default: the preset's)
    steps: int | None = None  # timed steps per row in each round (default: the preset's)
    warmup: int = 0  # untimed rounds before timing (the measuring pass already runs every row twice)
    measure: bool = True  # count FLOPs and peak memory in a separate pass
    flops_only: bool = False  # build the models on the meta device: FLOPs and parameters only, no time/memory
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads (default: torch's)
    seed: int = 0
    compile: str | None = None  # a torch.compile backend (e.g. "inductor"); None: eager

    def resolved(self) -> BenchConfig:
        """A copy with the preset's defaults filled in, validated (raises ValueError with what to change)."""
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        p = PRESETS[self.preset]
        cfg = replace(
            self,
            resolution=self.resolution or p.resolution,
            rows=tuple(self.rows or p.rows),
            repeats=p.repeats if self.repeats is None else self.repeats,
            steps=p.steps if self.steps is None else self.steps,
        )
        bad = [r for r in cfg.rows if r not in ROW_NAMES]
        if bad:
            raise ValueError(f"Unknown row(s) {bad}; rows are {', '.join(ROW_NAMES)}.")
        if "controlnext-sd15-release" in cfg.rows and "sd15" not in get_family(p.family).variants:
            raise ValueError("Row 'controlnext-sd15-release' is the SD1.5 release layout; it needs an sd15 preset.")
        if len(set(cfg.rows)) != len(cfg.rows):
            raise ValueError(f"Rows repeat: {cfg.rows}.")
        if not cfg.guidance:
            raise ValueError("Run at least one guidance mode (with or without classifier-free guidance).")
        if cfg.repeats < 1 or cfg.steps < 1 or cfg.warmup < 0:
            raise ValueError("repeats and steps must be >= 1 and warmup >= 0.")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}.")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device here; use --device cpu.")
        if cfg.device not in ("cpu", "meta") and not cfg.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}.")
        step = 32 if p.tiny else 64  # so that every UNet level (and the encoders' 1/8 output) has an integer size
        if cfg.resolution % step:
            raise ValueError(f"resolution must be a multiple of {step} px for {p.name}, got {cfg.resolution}.")
        if cfg.compile is not None:
            if cfg.flops_only:
                raise ValueError("--compile times compiled steps; it cannot be combined with --flops-only.")
            backends = torch._dynamo.list_backends(exclude_tags=())
            if cfg.compile not in backends:
                raise ValueError(f"Unknown torch.compile backend {cfg.compile!r}; choose one of {', '.join(backends)}.")
        if cfg.flops_only:
            cfg = replace(cfg, device="meta", measure=True)
        return cfg


@dataclass
class RowResult:
    """One row of the table (one model combination at one guidance mode); times in seconds, memory in bytes."""

    name: str
    cfg: bool
    batch: int
    step_seconds: float | None = None
    overhead: float | None = None
    step_cpu_seconds: float | None = None
    cpu_overhead: float | None = None
    prepare_seconds: float | None = None
    control_cpu_seconds: float | None = None  # CPU time inside the control path (hooks / ControlNet) per step
    control_share: float | None = None  # control_cpu_seconds / the base's step CPU time (same guidance)
    samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)
    control_cpu_samples: list[float] = field(default_factory=list)
    added_params: int = 0
    trainable_params: int = 0
    flops_per_step: int | None = None
    flops_overhead: float | None = None
    prepare_flops: int | None = None
    peak_mem_bytes: int | None = None
    peak_mem_overhead: float | None = None
    compile_seconds: float | None = None  # compiled runs: the first and warm-up calls minus as many steady steps
    compiled_graphs: int | None = None  # graphs dynamo made for the row (more than one: graph breaks)


@dataclass
class BenchResult:
    """A finished run: rows plus what is needed to reproduce and judge it."""

    preset: str
    family: str
    resolution: int
    device: str
    dtype: str
    rows: list[RowResult]
    machine: str
    date: str
    versions: dict[str, str]
    settings: dict[str, Any]
    command: str
    load_average: tuple[float, float] | None = None  # 1-minute load at the start and the end (POSIX only)

    def to_json(self) -> str:
        """One line of JSON (the ``--json`` output)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BenchResult:
        """Read a result back from :meth:`to_json`'s output (e.g. to re-render the docs without re-running)."""
        data = json.loads(text)
        data["rows"] = [RowResult(**row) for row in data["rows"]]
        if data.get("load_average") is not None:
            data["load_average"] = tuple(data["load_average"])
        return cls(**data)


# ---------------------------------------------------------------------------------------------- models and inputs
def build_random(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``factory()``'s model with random weights, created in ``dtype`` on ``device``, frozen and in eval mode."""
    # Random init straight in the target dtype and on the device: no full-size float32 copy on the host first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_unet(preset: Preset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base UNet of a preset with random weights (real architecture, or a tiny one for CI presets)."""
    from diffusers import UNet2DConditionModel

    from .testing import tiny_unet

    def make() -> nn.Module:
        if preset.tiny:
            return tiny_unet(preset.family)
        return UNet2DConditionModel(**get_family(preset.family).published_config)

    return build_random(make, device, dtype)


def build_controlnext(preset: Preset, row: str, unet: nn.Module, dtype: torch.dtype) -> ControlNeXtModel:
    """The ControlNeXt module of a row: the family's 3.5M layout, or the SD1.5 release layout."""
    from .testing import tiny_controlnext

    variant = "sd15" if row == "controlnext-sd15-release" else get_family(preset.family).light_variant  # also -plain
    device = unet.device

    def make() -> nn.Module:
        if preset.tiny:
            chans = unet.config.block_out_channels
            return tiny_controlnext(variant, out_channels=chans[-1] if variant == "sd15" else chans[0])
        return ControlNeXtModel.from_variant(variant)

    return build_random(make, device, dtype)


def build_controlnet(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """diffusers' ControlNet initialised from the UNet, as users create one to train."""
    from diffusers import ControlNetModel

    device = unet.device
    return build_random(lambda: ControlNetModel.from_unet(unet), device, dtype)


@dataclass
class _Inputs:
    latents: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor] | None
    condition: torch.Tensor  # (1, 3, H, W) in [0, 1]
    timesteps: torch.Tensor


def make_inputs(unet: nn.Module, resolution: int, batch: int, dtype: torch.dtype, seed: int) -> _Inputs:
    """Random latents, text embeddings (and SDXL's added conditions), one condition image and the timesteps."""
    device = unet.device
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    lat = resolution // 8
    cfg = unet.config
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype)
        added = {"text_embeds": randn(batch, pooled), "time_ids": ids.to(device)}
    condition = randn(1, 3, resolution, resolution)
    if device.type != "meta":
        condition = torch.rand(1, 3, resolution, resolution, generator=g).to(device=device, dtype=dtype)
    timesteps = torch.linspace(999, 1, SCHEDULE_STEPS).round().long().to(device)
    return _Inputs(
        latents=randn(batch, cfg.in_channels, lat, lat),
        text=randn(batch, TEXT_TOKENS, cfg.cross_attention_dim),
        added=added,
        condition=condition,
        timesteps=timesteps,
    )


# ---------------------------------------------------------------------------------------------- rows
class _Row:
    """One model combination. ``begin`` prepares a generation, ``step`` runs one denoising step's model calls."""

    name = "base"

    def __init__(self, unet: nn.Module, family: str):
        self.unet = unet
        self.family = family
        self.inputs: _Inputs | None = None
        self.control_cpu = 0.0  # CPU seconds spent in the control path during the current step
        self.call_unet: Callable[..., Any] = unet  # the UNet as called each step (a compiled wrapper when compiling)
        self.clock_hooks = True  # time the control path on the host (CPU runs; graph breaks under torch.compile)

    @property
    def added(self) -> list[nn.Module]:
        return []

    def trainable_params(self) -> int:
        return 0

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        self.inputs = inputs

    def compile(self, backend: str) -> None:
        """Call compiled wrappers from now on (after :meth:`begin`, so that the row's hooks are traced too)."""
        self.call_unet = torch.compile(self.unet, backend=backend)

    def uncompile(self) -> None:
        self.call_unet = self.unet

    def _unet(self, t: torch.Tensor, **extra: Any) -> Any:
        i = self.inputs
        kw = {"added_cond_kwargs": i.added} if i.added is not None else {}
        return self.call_unet(i.latents, t, encoder_hidden_states=i.text, return_dict=False, **kw, **extra)

    def step(self, k: int) -> Any:
        return self._unet(self.inputs.timesteps[k % SCHEDULE_STEPS])

    def end(self) -> None:
        self.inputs = None


class _ControlNeXtRow(_Row):
    """The UNet with a ControlNeXt module attached as the pipelines attach it (cached prefix, de-duplication)."""

    def __init__(self, unet: nn.Module, family: str, name: str, module: ControlNeXtModel, plain: bool = False):
        super().__init__(unet, family)
        self.name = name
        self.module = module
        self.plain = plain  # the release's way: no cached prefix, the condition duplicated for guidance
        self.adapter: ControlNeXtAdapter | None = None

    @property
    def added(self) -> list[nn.Module]:
        return [self.module]

    def trainable_params(self) -> int:
        pattern = re.compile("|".join(get_family(self.family).trainable_patterns))
        unet_part = sum(p.numel() for n, p in self.unet.named_parameters() if pattern.search(n))
        return _count(self.module) + unet_part

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        super().begin(inputs, guidance)
        cond = inputs.condition.to(dtype=self.module.dtype)
        if self.plain and guidance:
            cond = torch.cat([cond] * 2)  # one row per UNet sample, as the release feeds its encoder
        adapter = attach(
            self.unet, self.module, cond, cache_static=not self.plain,
            guidance=guidance and not self.plain, num_steps=SCHEDULE_STEPS, pixel_factor=8,
        )  # fmt: skip
        if not self.plain:
            adapter.slots[0].static()  # the timestep-independent prefix: once per generation
        self.adapter = adapter
        self._clock = _bracket_hooks(self, adapter) if self.clock_hooks else []

    def step(self, k: int) -> Any:
        self.adapter.set_step(k % SCHEDULE_STEPS)
        return super().step(k)

    def end(self) -> None:
        if self.adapter is not None:
            for h in self._clock:
                h.remove()
            self.adapter.detach()
        self.adapter = None
        super().end()


class _ControlNetRow(_Row):
    """diffusers ControlNet, run as StableDiffusion(XL)ControlNetPipeline runs it each step."""

    name = "controlnet"

    def __init__(self, unet: nn.Module, family: str, controlnet: nn.Module):
        super().__init__(unet, family)
        self.controlnet = controlnet
        self.call_controlnet: Callable[..., Any] = controlnet
        self.image: torch.Tensor | None = None

    @property
    def added(self) -> list[nn.Module]:
        return [self.controlnet]

    def trainable_params(self) -> int:
        return _count(self.controlnet)

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        super().begin(inputs, guidance)
        # The pipeline duplicates the condition for the two guidance halves once, before the loop.
        self.image = torch.cat([inputs.condition] * 2) if guidance else inputs.condition

    def compile(self, backend: str) -> None:
        super().compile(backend)
        self.call_controlnet = torch.compile(self.controlnet, backend=backend)

    def uncompile(self) -> None:
        super().uncompile()
        self.call_controlnet = self.controlnet

    def step(self, k: int) -> Any:
        i = self.inputs
        t = i.timesteps[k % SCHEDULE_STEPS]
        kw = {"added_cond_kwargs": i.added} if i.added is not None else {}
        c0 = time.process_time()
        down, mid = self.call_controlnet(
            i.latents,
            t,
            encoder_hidden_states=i.text,
            controlnet_cond=self.image,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
            **kw,
        )
        self.control_cpu += time.process_time() - c0
        return self._unet(t, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def end(self) -> None:
        self.image = None
        super().end()


def _bracket_hooks(row: _Row, adapter: ControlNeXtAdapter) -> list[torch.utils.hooks.RemovableHandle]:
    """Add the CPU time spent inside the adapter's hooks to ``row.control_cpu``.

    Each of the adapter's hook sites gets a clock-start hook placed before its hooks and a clock-stop hook after
    them, so the encoder (backbone pre-hook) and the Cross Normalization (injection hooks) are timed directly, not as
    the small difference of two long, noisy step times.
    """
    start = [0.0]

    def tick(*_: Any) -> None:
        start[0] = time.process_time()

    def tock(*_: Any) -> None:
        row.control_cpu += time.process_time() - start[0]

    return adapter.bracket(tick, tock)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight_bytes(modules: Sequence[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall time of a block of work on ``device``: CUDA events on CUDA (the GPU's own clock), else ``perf_counter``.

    :meth:`start` synchronises first, so work queued before the block is not counted; :meth:`stop` returns seconds.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._t0 = 0.0

    def start(self) -> None:
        _sync(self.device)
        if self.cuda:
            self._events[0].record(torch.cuda.current_stream(self.device))
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = self._events[1]
            end.record(torch.cuda.current_stream(self.device))
            end.synchronize()
            return self._events[0].elapsed_time(end) / 1e3
        return time.perf_counter() - self._t0



def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter():
    """FlopCounterMode that also counts CPU flash attention (torch registers only the CUDA attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextmanager
def peak_new_bytes(device: torch.device) -> Iterator[list[int]]:
    """Yield a one-element list that holds, on exit, the peak of bytes newly allocated inside the block."""
    out = [0]
    gc.collect()
    if device.type == "meta":
        yield out
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = torch.cuda.max_memory_allocated(device) - start
        return
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))  # negative sizes are frees
        stack.extend(ev.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    out[0] = peak


_peak_new_bytes = peak_new_bytes  # the earlier private name


# ---------------------------------------------------------------------------------------------- machine
def machine_description(device: torch.device) -> str:
    """CPU model and cores, RAM, torch threads, and the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        import psutil

        parts.append(f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    except ImportError:
        pass
    threads = torch.get_num_threads()
    parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    desc = ", ".join(parts)
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)} (host: {desc})"
    return desc


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "controlnext": __version__,
        "python": platform.python_version(),
    }


def command_line(cfg: BenchConfig, docs: str | None = None) -> str:
    """The ``controlnext bench`` command that reproduces ``cfg``."""
    p = PRESETS[cfg.preset]
    parts = ["controlnext bench", f"--preset {cfg.preset}"]
    if cfg.resolution != p.resolution:
        parts.append(f"--resolution {cfg.resolution}")
    if tuple(cfg.rows) != p.rows:
        parts.append(f"--rows {','.join(cfg.rows)}")
    if tuple(cfg.guidance) != (False, True):
        parts.append(f"--cfg {'on' if cfg.guidance[0] else 'off'}")
    if cfg.flops_only:
        parts.append("--flops-only")
    else:
        if cfg.compile:
            parts.append(f"--compile {cfg.compile}")
        parts += [f"--repeats {cfg.repeats}", f"--steps {cfg.steps}"]
        if cfg.warmup:
            parts.append(f"--warmup {cfg.warmup}")
        if not cfg.measure:
            parts.append("--no-measure")
        if cfg.device != "cpu":
            parts.append(f"--device {cfg.device}")
        if cfg.threads:
            parts.append(f"--threads {cfg.threads}")
    if cfg.dtype != "float32":
        parts.append(f"--dtype {cfg.dtype}")
    if docs:
        parts.append(f"--docs {docs}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- the run
def run_benchmark(
    config: BenchConfig, progress: bool = True, log: Callable[[str], None] | None = None, docs: str | None = None
) -> BenchResult:
    """Build the models of ``config`` and measure every row; see the module docstring for the method."""
    cfg = config.resolved()
    preset = PRESETS[cfg.preset]
    say = log or (lambda msg: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    say(f"building {preset.description} ({cfg.dtype}, {cfg.device}) ...")
    unet = build_unet(preset, device, dtype)
    rows: list[_Row] = []
    for name in cfg.rows:
        if name == "base":
            rows.append(_Row(unet, preset.family))
        elif name == "controlnet":
            rows.append(_ControlNetRow(unet, preset.family, build_controlnet(unet, dtype)))
        else:
            module = build_controlnext(preset, name, unet, dtype)
            rows.append(_ControlNeXtRow(unet, preset.family, name, module, plain=name == "controlnext-plain"))
    inputs = {g: make_inputs(unet, cfg.resolution, 2 if g else 1, dtype, cfg.seed) for g in cfg.guidance}
    results = {
        (r.name, g): RowResult(
            name=r.name,
            cfg=g,
            batch=2 if g else 1,
            added_params=sum(_count(m) for m in r.added),
            trainable_params=r.trainable_params(),
        )
        for g in cfg.guidance
        for r in rows
    }
    pairs = [(r, g) for g in cfg.guidance for r in rows]
    for row in rows:
        row.clock_hooks = cfg.compile is None

    with torch.inference_mode():
        if cfg.measure:
            say("counting FLOPs and peak memory (two untimed steps per row) ...")
            for row, g in _progress(pairs, progress, "measure"):
                res = results[(row.name, g)]
                # FLOPs and memory in separate steps: a dispatch mode (the FLOP counter) turns in-place ops into
                # out-of-place ones plus copies, which would inflate the memory peak.
                with _flop_counter() as prep:
                    row.begin(inputs[g], g)
                with _flop_counter() as flops:
                    out = row.step(0)
                del out
                row.end()
                res.prepare_flops = prep.get_total_flops()
                res.flops_per_step = flops.get_total_flops()
                if device.type == "meta":
                    continue
                with peak_new_bytes(device) as peak:
                    row.begin(inputs[g], g)
                    out = row.step(1)
                    del out
                    row.end()
                res.peak_mem_bytes = _weight_bytes([unet, *row.added]) + peak[0]
        if cfg.compile is not None:
            visits = _compiled_rounds(cfg, pairs, inputs, device, progress, results)
            _summarise(results, visits, cfg)
        elif not cfg.flops_only:
            visits = _timed_rounds(cfg, pairs, inputs, device, progress)
            _summarise(results, visits, cfg)
    _relate(results, cfg)

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return BenchResult(
        preset=cfg.preset,
        family=preset.family,
        resolution=cfg.resolution,
        device=cfg.device,
        dtype=cfg.dtype,
        rows=[results[(r.name, g)] for g in cfg.guidance for r in rows],
        machine=machine_description(device) if device.type != "meta" else "meta device (no computation)",
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=_versions(),
        settings={
            "repeats": cfg.repeats,
            "steps": cfg.steps,
            "warmup": cfg.warmup,
            "threads": torch.get_num_threads(),
            "tiny": preset.tiny,
            "description": preset.description,
            "compile": cfg.compile,
            "timer": "cuda-events" if device.type == "cuda" else "perf_counter",
        },
        command=command_line(cfg, docs),
        load_average=(load_start, load_end) if load_start is not None else None,
    )


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _timed_rounds(
    cfg: BenchConfig, pairs: list, inputs: dict, device: torch.device, progress: bool
) -> dict[tuple[str, bool], list[tuple[list[float], list[float], float, list[float]]]]:
    """Run warm-up and timed rounds, rows in a rotating order; per row, (wall, cpu, prepare, control) per round."""
    visits: dict[tuple[str, bool], list] = {(r.name, g): [] for r, g in pairs}
    total = (cfg.warmup + cfg.repeats) * len(pairs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="timing", leave=False)
    clock = StepClock(device)
    k = 0
    for rnd in range(cfg.warmup + cfg.repeats):
        shift = rnd % len(pairs)
        for row, g in pairs[shift:] + pairs[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            row.begin(inputs[g], g)
            _sync(device)
            prepare = time.perf_counter() - t0
            wall, cpu, control = [], [], []
            for _ in range(cfg.steps):
                k += 1
                row.control_cpu = 0.0
                clock.start()
                c0 = time.process_time()
                out = row.step(k)
                wall.append(clock.stop())
                cpu.append(time.process_time() - c0)
                control.append(row.control_cpu)
                del out
            row.end()
            if rnd >= cfg.warmup:
                visits[(row.name, g)].append((wall, cpu, prepare, control))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return visits


def _compiled_rounds(
    cfg: BenchConfig, pairs: list, inputs: dict, device: torch.device, progress: bool, results: dict
) -> dict[tuple[str, bool], list[tuple[list[float], list[float], float, list[float]]]]:
    """Compile and time each row on its own (see the module docstring); the same per-round layout as timed rounds."""
    from torch._dynamo.utils import counters

    visits: dict[tuple[str, bool], list] = {}
    clock = StepClock(device)
    warm = max(cfg.warmup, 2)  # the second call recompiles once, when dynamo makes the changing step index dynamic
    k = 0
    for row, g in _progress(pairs, progress, "compile"):
        torch._dynamo.reset()  # no code compiled for another row's hooks
        graphs0 = counters["stats"]["unique_graphs"]
        _sync(device)
        t0 = time.perf_counter()
        row.begin(inputs[g], g)
        _sync(device)
        prepare = time.perf_counter() - t0
        row.compile(cfg.compile)
        per_round = []
        try:
            warm_times = []  # the first call and the warm-up calls: compiling (and any recompiling) happens here
            for _ in range(1 + warm):
                k += 1
                clock.start()
                out = row.step(k)
                warm_times.append(clock.stop())
                del out
            graphs = counters["stats"]["unique_graphs"]
            # A recompilation now would put compile time (or an eager fallback) into the timed steps.
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(cfg.repeats):
                    wall, cpu = [], []
                    for _ in range(cfg.steps):
                        k += 1
                        clock.start()
                        c0 = time.process_time()
                        out = row.step(k)
                        wall.append(clock.stop())
                        cpu.append(time.process_time() - c0)
                        del out
                    per_round.append((wall, cpu, prepare, []))
            if counters["stats"]["unique_graphs"] != graphs:
                raise RuntimeError(f"Row {row.name!r} was recompiled during its timed steps; the timing is not valid.")
        finally:
            row.uncompile()
            row.end()
        res = results[(row.name, g)]
        res.compiled_graphs = graphs - graphs0
        steady = statistics.median(s for wall, *_ in per_round for s in wall)
        res.compile_seconds = sum(warm_times) - len(warm_times) * steady
        visits[(row.name, g)] = per_round
    torch._dynamo.reset()
    return visits


def _summarise(results: dict, visits: dict, cfg: BenchConfig) -> None:
    cpu_device = torch.device(cfg.device).type == "cpu"
    for key, res in results.items():
        per_round = visits[key]
        res.samples = [round(s, 6) for wall, *_ in per_round for s in wall]
        res.cpu_samples = [round(s, 6) for _, cpu, *_ in per_round for s in cpu]
        res.step_seconds = statistics.median(res.samples)
        res.step_cpu_seconds = statistics.median(res.cpu_samples)
        res.prepare_seconds = statistics.median(p for _, _, p, _ in per_round)
        controls = [round(s, 6) for *_, control in per_round for s in control]  # none when compiled
        if cpu_device and key[0] != "base" and controls:  # host clocks say nothing about asynchronous GPU work
            res.control_cpu_samples = controls
            res.control_cpu_seconds = statistics.median(controls)
        base = visits.get(("base", key[1]))
        if base is None:
            continue
        # Paired ratios: each round's row against the base of the same round, so slow drifts in machine load cancel.
        ratios = [statistics.median(r[0]) / statistics.median(b[0]) for r, b in zip(per_round, base)]
        cpu_ratios = [statistics.median(r[1]) / statistics.median(b[1]) for r, b in zip(per_round, base)]
        res.overhead = statistics.median(ratios) - 1.0
        res.cpu_overhead = statistics.median(cpu_ratios) - 1.0
        if res.control_cpu_seconds is not None:
            res.control_share = res.control_cpu_seconds / statistics.median(s for b in base for s in b[1])


def _relate(results: dict, cfg: BenchConfig) -> None:
    """FLOP and memory overheads against the base row of the same guidance mode."""
    for (_, g), res in results.items():
        base = results.get(("base", g))
        if base is None:
            continue
        if res.flops_per_step is not None and base.flops_per_step:
            res.flops_overhead = res.flops_per_step / base.flops_per_step - 1.0
        if res.peak_mem_bytes is not None and base.peak_mem_bytes:
            res.peak_mem_overhead = res.peak_mem_bytes / base.peak_mem_bytes - 1.0


# ---------------------------------------------------------------------------------------------- reporting
def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def _fmt_params(n: int) -> str:
    if n == 0:
        return "0"
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_flops(n: int | None) -> str:
    if n is None:
        return "-"
    g = n / 1e9
    return f"{g:,.0f}" if g >= 1000 else f"{g:.4g}"


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x >= 0.01 else f"{x * 1e3:.2f} ms"


def round_overheads(result: BenchResult, row: RowResult, cpu: bool = False) -> list[float]:
    """Per-round overheads of ``row`` vs the base with the same guidance (what ``overhead`` is the median of)."""
    base = next((r for r in result.rows if r.name == "base" and r.cfg == row.cfg), None)
    steps = int(result.settings.get("steps", 1))
    if base is None:
        return []
    a, b = (row.cpu_samples, base.cpu_samples) if cpu else (row.samples, base.samples)
    rounds = min(len(a), len(b)) // steps
    return [
        statistics.median(a[i * steps : (i + 1) * steps]) / statistics.median(b[i * steps : (i + 1) * steps]) - 1.0
        for i in range(rounds)
    ]


def _fmt_overhead(result: BenchResult, row: RowResult, cpu: bool) -> str:
    """Median overhead, with the range over rounds when there are several (the measurement's spread)."""
    value = row.cpu_overhead if cpu else row.overhead
    rounds = round_overheads(result, row, cpu)
    if value is None or row.name == "base" or len(rounds) < 2:
        return _fmt_pct(value)
    return f"{_fmt_pct(value)} ({min(rounds) * 100:+.1f} to {max(rounds) * 100:+.1f})"


def _fmt_control(row: RowResult) -> str:
    if row.control_cpu_seconds is None:
        return "-"
    return f"{_fmt_s(row.control_cpu_seconds)} ({_fmt_pct(row.control_share)})"


# Table columns: header, formatter, and whether the column needs timing (dropped for FLOP-only runs).
_COLUMNS: list[tuple[str, Callable[[BenchResult, RowResult], str], bool]] = [
    ("row", lambda _, r: r.name, False),
    ("CFG", lambda _, r: "yes" if r.cfg else "no", False),
    ("batch", lambda _, r: str(r.batch), False),
    ("step (s)", lambda _, r: _fmt_s(r.step_seconds), True),
    ("overhead (range over rounds)", lambda res, r: _fmt_overhead(res, r, cpu=False), True),
    ("CPU s", lambda _, r: _fmt_s(r.step_cpu_seconds), True),
    ("CPU overhead (range)", lambda res, r: _fmt_overhead(res, r, cpu=True), True),
    ("GFLOPs/step", lambda _, r: _fmt_flops(r.flops_per_step), False),
    ("FLOP overhead", lambda _, r: _fmt_pct(r.flops_overhead), False),
    ("control CPU s (share of base)", lambda _, r: _fmt_control(r), True),
    ("per-generation s", lambda _, r: _fmt_s(r.prepare_seconds), True),
    ("per-generation GFLOPs", lambda _, r: _fmt_flops(r.prepare_flops) if r.prepare_flops else "0", False),
    ("added params", lambda _, r: _fmt_params(r.added_params), False),
    ("trainable params", lambda _, r: _fmt_params(r.trainable_params), False),
    ("peak memory", lambda _, r: _fmt_bytes(r.peak_mem_bytes), True),
    ("memory overhead", lambda _, r: _fmt_pct(r.peak_mem_overhead), True),
    ("compile s (graphs)", lambda _, r: f"{_fmt_s(r.compile_seconds)} ({r.compiled_graphs})", True),
]


def render_table(result: BenchResult) -> str:
    """The result as a Markdown table (also readable as plain text)."""
    timed = any(r.step_seconds is not None or r.peak_mem_bytes is not None for r in result.rows)
    compiled = any(r.compile_seconds is not None for r in result.rows)
    cols = [(h, f) for h, f, needs_time in _COLUMNS if (timed or not needs_time) and (compiled or h[:7] != "compile")]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(result, r) for _, f in cols) + " |" for r in result.rows]
    return "\n".join(lines)


def section_key(result: BenchResult) -> str:
    """Identifies a run's section in the docs file: preset, size, device kind and dtype."""
    return f"{result.preset}-{result.resolution}px-{result.device.split(':')[0]}-{result.dtype}"


def render_markdown(result: BenchResult) -> str:
    """A docs section: settings, machine, versions, the table and the command that regenerates it."""
    s = result.settings
    v = result.versions
    load = ""
    if result.load_average and result.device != "meta":
        start, end = result.load_average
        load = f"; 1-min load average {start:.1f} at the start, {end:.1f} at the end"
    how = (
        "FLOPs and parameters only (models on the meta device)"
        if result.device == "meta"
        else f"{s['repeats']} interleaved rounds x {s['steps']} timed step(s) per row, {s['warmup']} warm-up round(s)"
    )
    lines = [
        f"### {s['description']}: {result.resolution}x{result.resolution} px, {result.device}, {result.dtype}"
        + (" (FLOPs and parameters)" if result.device == "meta" else ""),
        "",
        f"- Date: {result.date}",
        f"- Machine: {result.machine}{load}",
        f"- Versions: torch {v['torch']}, diffusers {v['diffusers']}, controlnext {v['controlnext']}, "
        f"python {v['python']}",
        f"- Method: {how}",
        f"- Regenerate: `{result.command}`",
        "",
        render_table(result),
    ]
    return "\n".join(lines) + "\n"


def update_docs(path: str | Path, result: BenchResult) -> Path:
    """Write (or replace) this run's section in a Markdown file, keeping everything else in it."""
    path = Path(path)
    key = section_key(result)
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{render_markdown(result)}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n<!-- bench:sections -->\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    elif "<!-- bench:sections -->" in text:
        # After the last generated section (or the marker), so sections keep the order they were first written in.
        marker = "<!-- bench:sections -->"
        head, tail = text.split(marker, 1)
        cut = tail.rfind("<!-- /bench:")
        cut = 0 if cut < 0 else tail.index("-->", cut) + 3
        text = head + marker + tail[:cut] + f"\n\n{block}" + tail[cut:]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
