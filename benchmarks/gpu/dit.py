"""Part 4: the transformer presets, SD3-medium and Flux.1-dev at 1024 px in bfloat16: base / ControlNeXt / diffusers'
ControlNet (``SD3ControlNetModel`` with 6 layers, ``FluxControlNetModel`` with 5 double + 10 single blocks: the
InstantX checkpoints' layer counts), per-step time, overhead vs the base and peak memory.

Every number comes from :func:`controlnext.bench.run_benchmark` through part 1's :func:`inference.eager_items` (the
same method: rows interleaved, CUDA events, one warm-up round). Guidance as each family's pipeline runs by default:
SD3 with its classifier-free guidance batch (batch 2, the condition encoded once), Flux.1-dev guidance-distilled
(batch 1, no CFG batch). The smoke run uses the tiny ``ci-sd3`` / ``ci-flux`` presets on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import inference
from common import OK, Item, fmt_pct

DIT_PRESETS: tuple[str, ...] = ("sd3-1024", "flux-1024")  # controlnext.bench presets of the transformer families
SMOKE_PRESETS: tuple[str, ...] = ("ci-sd3", "ci-flux")
DTYPE = "bfloat16"  # what SD3 and Flux are run in
GOAL_OVERHEAD = 0.02  # the FLOP goal of the transformer presets, held against the measured step time here


def items(smoke: bool, raw_dir: Path) -> list[Item]:
    """One item per preset: its three rows in one interleaved run."""
    settings = inference.Settings.make(smoke, None)
    presets = SMOKE_PRESETS if smoke else DIT_PRESETS
    return inference.eager_items(settings, raw_dir, configs=[(p, DTYPE) for p in presets])


def table(rows: list[dict[str, Any]]) -> str:
    return inference.table(rows)


def goals(records: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """ControlNeXt's per-step overhead vs the base for each transformer preset, ControlNet's beside it."""
    out = []
    for preset in SMOKE_PRESETS if smoke else DIT_PRESETS:
        found = {r["row"]: r for r in records if r.get("preset") == preset and r.get("status") == OK}
        goal = f"ControlNeXt per-step overhead <= {GOAL_OVERHEAD:.0%} of the base, {preset} {DTYPE}"
        cn = found.get("controlnext", {}).get("overhead")
        if cn is None:
            out.append(dict(goal=goal, measured="not measured", status="not measured"))
            continue
        measured = f"{fmt_pct(cn)} (ControlNet in the same run: {fmt_pct(found.get('controlnet', {}).get('overhead'))})"
        out.append(dict(goal=goal, measured=measured, status="met" if cn <= GOAL_OVERHEAD else "not met", value=cn))
    return out
