#!/usr/bin/env python
"""Guidance sweep of the shipped demo model: control fidelity and the base's caption accuracy per guidance scale.

    python benchmarks/demo_guidance.py [--assets DIR] [--json benchmarks/results/demo_guidance.json]

Same files, same default cases and seeds as ``controlnext demo`` (8 per condition, 20 steps), only the guidance
changes; the base alone is read back on 64 held-out captions by ``scripts/train_demo_ship.py``'s reader at the
guidances listed in ``--base-guidances``. docs/demo.md ("Guidance") explains why the demo samples at 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from train_demo_ship import ASSETS, base_accuracy, module_fidelity  # noqa: E402

from controlnext.bench.measure import machine_description  # noqa: E402
from controlnext.shapes.demo import DEMO_STEPS  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=ASSETS, help="demo folder (base/, edges/, mask/)")
    p.add_argument("--guidances", type=floats, default=floats("1.5,2,2.5,3,3.5,4,5,7.5"))
    p.add_argument("--base-guidances", type=floats, default=floats("1.5,2,2.5,3,5"))
    p.add_argument("--n", type=int, default=8, help="cases per condition (default 8, as `controlnext demo`)")
    p.add_argument("--n-base", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    rows = []
    for g in args.guidances:
        row: dict = {"guidance": g}
        for cond in ("edges", "mask"):
            fid = module_fidelity(args.assets, cond, args.n, DEMO_STEPS, g)
            row[cond] = {"with_control": fid["with_control"], "without_control": fid["without_control"]}
        if g in args.base_guidances:
            acc = base_accuracy(args.assets / "base", args.n_base, DEMO_STEPS, g)
            row["base"] = acc["generated"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n| guidance | edge F1 with / without ({args.n} cases) | mask IoU with / without | "
          f"base: shape kind right ({args.n_base} captions) | colour, background right |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        b = r.get("base")
        base = (f"{b['shape']:.0%} | {b['colour']:.0%}, {b['background']:.0%}" if b else " | ").replace("%", " %")
        print(f"| {r['guidance']:g} | {r['edges']['with_control']:.3f} / {r['edges']['without_control']:.3f} | "
              f"{r['mask']['with_control']:.3f} / {r['mask']['without_control']:.3f} | {base} |")  # fmt: skip
    machine = f"{machine_description(torch.device('cpu'))}; torch {torch.__version__}"
    print(f"\n{DEMO_STEPS} steps; {machine}; {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"steps": DEMO_STEPS, "machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
