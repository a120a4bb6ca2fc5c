"""Part 1: per-step time and peak memory of base / ControlNeXt / ControlNet, with guidance, eager and compiled.

Every number comes from :func:`controlnext.bench.run_benchmark` (``controlnext bench``): the same rows, inputs and
method as the CPU tables in docs/benchmarks.md. On CUDA the steps are timed with CUDA events after one untimed
warm-up round, peak memory is ``torch.cuda.max_memory_allocated`` (weights included) in its own untimed step.
Compiled rows (``torch.compile``, inductor on the GPU) are each compiled with their hooks in place and timed on their
own; compile time is reported separately and a recompilation during the timed steps fails the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import OK, Item, fmt_gib, fmt_pct, fmt_s, markdown_table, status_cell

ROWS = ("base", "controlnext", "controlnet")
# (preset, dtype) in order of priority: the goal's configuration first.
GPU_CONFIGS = (("sdxl-1024", "float16"), ("sd15-512", "float16"), ("sdxl-1024", "bfloat16"))
SMOKE_CONFIGS = (("ci-sdxl", "float16"), ("ci", "float16"), ("ci-sdxl", "bfloat16"))
GOAL_OVERHEAD = 0.03  # ControlNeXt per-step overhead vs the base, with guidance, SDXL 1024 px fp16


@dataclass(frozen=True)
class Settings:
    device: str
    smoke: bool
    compile_backend: str
    repeats: int
    steps: int

    @classmethod
    def make(cls, smoke: bool, compile_backend: str | None) -> Settings:
        if smoke:
            # Dynamo with the eager backend: traces and guards as with inductor, without the code generation that
            # takes minutes per UNet on a small CPU (the tiny SD1.5 base UNet: 142 s with inductor on 2 cores).
            return cls("cpu", True, compile_backend or "eager", repeats=2, steps=2)
        # 8 interleaved rounds x 5 steps: enough rounds for their spread (in the table) to be set against the 3 %.
        return cls("cuda", False, compile_backend or "inductor", repeats=8, steps=5)

    def dtype(self, requested: str) -> str:
        # CPU smoke runs: float16 convolutions are missing or very slow on CPUs, so float16 runs as float32.
        return "float32" if self.smoke and requested == "float16" else requested


def _config_name(preset: str, dtype: str) -> str:
    return f"{preset} {dtype}"


def _records(result: Any, mode: str, requested: str) -> list[dict[str, Any]]:
    from controlnext.bench import round_overheads

    out = []
    for row in result.rows:
        rec: dict[str, Any] = dict(
            preset=result.preset,
            family=result.family,
            resolution=result.resolution,
            requested_dtype=requested,
            dtype=result.dtype,
            mode=mode,
            row=row.name,
            cfg=row.cfg,
            batch=row.batch,
            step_s=row.step_seconds,
            step_samples_s=row.samples,
            added_params=row.added_params,
        )
        if row.overhead is not None:
            rec["overhead"] = row.overhead
            rounds = round_overheads(result, row)
            if row.name != "base" and len(rounds) > 1:  # the spread over the interleaved rounds
                rec["overhead_min"], rec["overhead_max"] = min(rounds), max(rounds)
        if row.peak_mem_bytes is not None:
            rec["peak_bytes"] = row.peak_mem_bytes
        if row.peak_mem_overhead is not None:
            rec["peak_overhead"] = row.peak_mem_overhead
        if row.flops_per_step is not None:
            rec["flops_per_step"] = row.flops_per_step
        if row.compile_seconds is not None:
            rec["compile_s"] = row.compile_seconds
            rec["compiled_graphs"] = row.compiled_graphs
        out.append(rec)
    return out


def _save(result: Any, raw_dir: Path, name: str) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{name.replace(' ', '_')}.json").write_text(result.to_json() + "\n")


def eager_items(settings: Settings, raw_dir: Path, configs: Sequence[tuple[str, str]] | None = None) -> list[Item]:
    """One item per (preset, dtype) of ``configs`` (default: this part's): every row in one interleaved run, with
    guidance where the family batches it (Flux-dev, guidance-distilled, without)."""
    from controlnext.bench import PRESETS, BenchConfig, run_benchmark
    from controlnext.families import get_family

    items = []
    for preset, requested in configs or (SMOKE_CONFIGS if settings.smoke else GPU_CONFIGS):
        guidance = (True,) if get_family(PRESETS[preset].family).cfg_batch else (False,)

        def run(preset: str = preset, requested: str = requested, guidance=guidance) -> list[dict[str, Any]]:
            cfg = BenchConfig(
                preset=preset,
                rows=ROWS,
                guidance=guidance,
                repeats=settings.repeats,
                steps=settings.steps,
                warmup=1,
                device=settings.device,
                dtype=settings.dtype(requested),
            )
            result = run_benchmark(cfg, progress=False)
            _save(result, raw_dir, f"eager {_config_name(preset, requested)}")
            return _records(result, "eager", requested)

        items.append(Item(f"eager {_config_name(preset, requested)}", run, like=items[0].name if items else None))
    return items


def compile_items(settings: Settings, raw_dir: Path) -> list[Item]:
    """One item per (preset, dtype, row), so that each compiled row is kept even if a later one runs out of time.

    The overhead of a compiled row is against the compiled base of the same preset and dtype (measured just before).
    """
    from controlnext.bench import BenchConfig, run_benchmark

    # Smoke: one configuration and two rows exercise the path (the tiny SD1.5 layout: the quickest for dynamo to
    # trace; each traced row costs several seconds on the CI CPU; ControlNet's compiled wrappers are unit-tested).
    configs = SMOKE_CONFIGS[1:2] if settings.smoke else GPU_CONFIGS
    rows = ROWS[:2] if settings.smoke else ROWS
    base_step: dict[str, float] = {}
    mode = f"compile ({settings.compile_backend})"
    items: list[Item] = []
    for preset, requested in configs:
        for row in rows:

            def run(preset: str = preset, requested: str = requested, row: str = row) -> list[dict[str, Any]]:
                cfg = BenchConfig(
                    preset=preset,
                    rows=(row,),
                    guidance=(True,),
                    repeats=settings.repeats,
                    steps=settings.steps,
                    warmup=2,
                    measure=False,
                    device=settings.device,
                    dtype=settings.dtype(requested),
                    compile=settings.compile_backend,
                )
                result = run_benchmark(cfg, progress=False)
                name = _config_name(preset, requested)
                _save(result, raw_dir, f"compile {name} {row}")
                records = _records(result, mode, requested)
                if row == "base":
                    base_step[name] = records[0]["step_s"]
                elif name in base_step:
                    records[0]["overhead"] = records[0]["step_s"] / base_step[name] - 1.0
                return records

            items.append(
                Item(f"compile {_config_name(preset, requested)} {row}", run, like=items[-1].name if items else None)
            )
    return items


def _fmt_overhead(r: dict[str, Any]) -> str:
    if "overhead_min" not in r:
        return fmt_pct(r.get("overhead"))
    return f"{fmt_pct(r['overhead'])} ({fmt_pct(r['overhead_min'])} to {fmt_pct(r['overhead_max'])})"


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("configuration", lambda r: f"{r.get('preset', '')} {r.get('resolution', '')} px" if "preset" in r else r["item"]),
    (
        "dtype",
        lambda r: (
            r.get("dtype", "-")
            + (f" (for {r['requested_dtype']})" if r.get("dtype") != r.get("requested_dtype") and "dtype" in r else "")
        ),
    ),
    ("mode", lambda r: r.get("mode", "-")),
    ("row", lambda r: r.get("row", "-")),
    ("batch (CFG)", lambda r: str(r.get("batch", "-"))),
    ("step", lambda r: fmt_s(r.get("step_s"))),
    ("overhead vs base (range over rounds)", _fmt_overhead),
    ("peak memory", lambda r: fmt_gib(r.get("peak_bytes"))),
    ("memory overhead", lambda r: fmt_pct(r.get("peak_overhead"))),
    ("compile (graphs)", lambda r: f"{fmt_s(r['compile_s'])} ({r['compiled_graphs']})" if "compile_s" in r else "-"),
    ("status", status_cell),
]


def table(records: list[dict[str, Any]]) -> str:
    return markdown_table([h for h, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in records])


def goals(records: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """The per-step overhead goal, eager (and compiled when measured), with ControlNet's overhead beside it."""
    preset = "ci-sdxl" if smoke else "sdxl-1024"
    out = []
    for mode_prefix in ("eager", "compile"):
        found = {
            r["row"]: r
            for r in records
            if r.get("preset") == preset
            and r.get("requested_dtype") == "float16"
            and str(r.get("mode", "")).startswith(mode_prefix)
            and r.get("status") == OK
        }
        cn = found.get("controlnext", {}).get("overhead")
        net = found.get("controlnet", {}).get("overhead")
        goal = (
            f"ControlNeXt per-step overhead <= {GOAL_OVERHEAD:.0%} of the base, CFG, SDXL 1024 px fp16 ({mode_prefix})"
        )
        if cn is None:
            out.append(dict(goal=goal, measured="not measured", status="not measured"))
            continue
        measured = f"{fmt_pct(cn)} (ControlNet in the same run: {fmt_pct(net)})"
        out.append(dict(goal=goal, measured=measured, status="met" if cn <= GOAL_OVERHEAD else "not met", value=cn))
    return out
