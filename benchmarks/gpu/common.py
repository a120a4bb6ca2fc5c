"""Shared pieces of the GPU validation kit: measurement records, their validation, budgets, the item runner.

A part (inference, video, training, ...) is a list of :class:`Item` s; each item measures something and returns one
or more records (plain dicts). Every record is validated before it is written: a measured time that is zero,
negative or not finite, or a zero peak memory on CUDA, marks it ``failed`` with the reason (the kit's exit code is
then non-zero), so a broken measurement is never reported as a number.

Field conventions the validation relies on: names ending in ``_s`` are measured seconds (must be finite and > 0),
``_samples_s`` lists of them, ``_bytes`` measured memory (finite; > 0 on CUDA, >= 0 on the CPU, whose meters count
only new allocations); ``overhead`` fields are ratios (finite). A measurement that was not made is left out, never
stored as None.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Statuses: only FAILED makes the kit's exit code non-zero; the others say why a number is missing.
OK, FAILED, OOM, OUT_OF_BUDGET, NOT_YET, SKIPPED = "ok", "failed", "oom", "out of budget", "not yet", "skipped"


class MeasurementError(ValueError):
    """A measurement that cannot be right (zero, negative or non-finite time; zero peak memory on CUDA)."""


def problems(record: dict[str, Any], cuda: bool) -> list[str]:
    """What is wrong with the measurements in ``record`` (empty when they are plausible)."""
    out = []

    def bad_number(value: Any) -> bool:
        return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)

    for key, value in record.items():
        if key.endswith("_samples_s"):
            if not isinstance(value, list) or not value:
                out.append(f"{key}: no samples")
            elif any(bad_number(v) or v <= 0 for v in value):
                bad = [v for v in value if bad_number(v) or v <= 0]
                out.append(f"{key}: {len(bad)} sample(s) not a positive finite time, e.g. {bad[0]!r}")
        elif key.endswith("_s"):
            if bad_number(value) or value <= 0:
                out.append(f"{key} = {value!r}: a measured time must be a positive finite number of seconds")
        elif key.endswith("_bytes"):
            if bad_number(value) or value < 0:
                out.append(f"{key} = {value!r}: memory must be a finite number of bytes >= 0")
            elif cuda and value == 0:
                out.append(f"{key} = 0: a zero peak memory on CUDA means the meter saw nothing")
        elif "overhead" in key and (bad_number(value)):
            out.append(f"{key} = {value!r}: an overhead must be a finite ratio")
    return out


def check(record: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """``record`` with ``status`` set: ``failed`` (and ``error`` listing the problems) when a measurement is wrong."""
    record.setdefault("status", OK)
    if record["status"] == OK:
        found = problems(record, cuda)
        if found:
            record["status"] = FAILED
            record["error"] = "invalid measurement: " + "; ".join(found)
    return record


def require(record: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Raise :class:`MeasurementError` when ``record`` holds a wrong measurement (for use inside a measurement)."""
    found = problems(record, cuda)
    if found:
        raise MeasurementError("; ".join(found))
    return record


@dataclass
class Item:
    """One measurement of a part: ``run()`` returns its records. ``like``: an earlier item whose duration
    estimates this one's (an item that would not fit the part's remaining budget is recorded, not started)."""

    name: str
    run: Callable[[], list[dict[str, Any]]]
    like: str | None = None


def is_oom(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(err).lower()


class RecordFile:
    """Append-only JSON lines: a ``plan`` line first, then one line per record, flushed at once (a part killed at its
    budget keeps what it measured)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, obj: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(obj, default=str) + "\n")
            f.flush()


def read_records(path: Path) -> tuple[list[str] | None, list[dict[str, Any]]]:
    """(planned item names or None, records) from a :class:`RecordFile`."""
    plan, records = None, []
    if not Path(path).exists():
        return plan, records
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if obj.get("kind") == "plan":
            plan = obj["items"]
        else:
            records.append(obj)
    return plan, records


def run_items(
    part: str,
    items: list[Item],
    out: RecordFile,
    budget_s: float,
    cuda: bool,
    fault: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``items`` in order within ``budget_s`` seconds, validating and writing every record as it comes.

    ``fault``: zero the first measured time of the first record before validation (to test that it fails).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out.write({"kind": "plan", "part": part, "items": [i.name for i in items]})
    start = time.monotonic()
    took: dict[str, float] = {}
    written: list[dict[str, Any]] = []
    for item in items:
        left = budget_s - (time.monotonic() - start)
        estimate = took.get(item.like) if item.like else None
        if left <= 0 or (estimate is not None and estimate > left):
            why = f"{left:.0f} s of the part's {budget_s:.0f} s budget left"
            why += f", about {estimate:.0f} s needed (like {item.like})" if estimate is not None else ""
            records = [{"status": OUT_OF_BUDGET, "error": why}]
            if estimate is not None:
                took[item.name] = estimate  # so that an item like this one is estimated too
        else:
            say(f"[{part}] {item.name} ({left:.0f} s of budget left) ...")
            t0 = time.monotonic()
            try:
                records = item.run()
                if not records:
                    raise MeasurementError("the measurement returned no record")
            except Exception as err:  # recorded, and the part goes on with its next item
                status = OOM if is_oom(err) else FAILED
                records = [{"status": status, "error": f"{type(err).__name__}: {err}"[:2000]}]
                if status == FAILED:
                    traceback.print_exc()
            took[item.name] = time.monotonic() - t0
            _free_memory()
        for record in records:
            record = {"part": part, "item": item.name, **record}
            if fault and not written and record.get("status", OK) == OK:
                _inject_fault(record)
            check(record, cuda)
            if record["status"] == FAILED:
                say(f"[{part}] {item.name}: FAILED: {record['error']}")
            out.write(record)
            written.append(record)
    return written


def _inject_fault(record: dict[str, Any]) -> None:
    for key in record:
        if key.endswith("_samples_s") and record[key]:
            record[key] = [0.0, *record[key][1:]]
            return
        if key.endswith("_s"):
            record[key] = 0.0
            return
    raise MeasurementError(f"--fault: the first record of {record['part']} has no measured time to corrupt")


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------ formatting
def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def fmt_gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status_cell(record: dict[str, Any]) -> str:
    status = record.get("status", OK)
    if status == OK:
        return "ok"
    return f"**{status}**: {record.get('error', '')}"[:300]
