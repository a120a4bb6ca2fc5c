"""Running the benchmark: rows interleaved round-robin, eager or compiled, summarised against the base."""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import time
from collections.abc import Callable

import torch

from ..families import get_family
from .measure import StepClock, _flop_counter, _sync, _versions, machine_description, peak_new_bytes
from .models import build_controlnet, build_controlnext, build_unet, make_inputs
from .presets import PRESETS
from .results import DTYPES, BenchConfig, BenchResult, RowResult
from .rows import _ControlNeXtRow, _count, _Row, _weight_bytes, controlnet_row


def command_line(cfg: BenchConfig, docs: str | None = None) -> str:
    """The ``controlnext bench`` command that reproduces ``cfg``."""
    p = PRESETS[cfg.preset]
    parts = ["controlnext bench", f"--preset {cfg.preset}"]
    if cfg.resolution != p.resolution:
        parts.append(f"--resolution {cfg.resolution}")
    if tuple(cfg.rows) != p.rows:
        parts.append(f"--rows {','.join(cfg.rows)}")
    if tuple(cfg.guidance) != ((False, True) if get_family(p.family).cfg_batch else (False,)):
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
            rows.append(controlnet_row(unet, preset.family, build_controlnet(unet, dtype, preset)))
        else:
            module = build_controlnext(preset, name, unet, dtype)
            rows.append(_ControlNeXtRow(unet, preset.family, name, module, plain=name == "controlnext-plain"))
    inputs = {
        g: make_inputs(unet, cfg.resolution, 2 if g else 1, dtype, cfg.seed, preset.text_tokens) for g in cfg.guidance
    }
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
