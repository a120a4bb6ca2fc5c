"""The benchmark's tables: terminal table and the markdown section the docs hold (the only markdown writer)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from .results import BenchResult, RowResult


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
