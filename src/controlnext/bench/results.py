"""The benchmark's settings and results: what one run is asked to do and what it measured."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..families import get_family
from .presets import PRESETS, ROW_NAMES

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
        family = get_family(p.family)
        if not family.cfg_batch and True in cfg.guidance:
            # Flux-dev is guidance-distilled: its pipeline makes one transformer call per step, never a CFG batch.
            if tuple(cfg.guidance) != (False, True):
                raise ValueError(
                    f"{family.title} makes no classifier-free guidance batch (guidance-distilled); "
                    f"preset {p.name} runs without it: use --cfg off (or both)."
                )
            cfg = replace(cfg, guidance=(False,))
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
