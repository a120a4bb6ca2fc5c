"""`controlnext demo`: the shipped shapes model with and without ControlNeXt, an image grid and fidelity numbers."""

from __future__ import annotations

import argparse
import json
import time

from ..cli import UserError
from . import add_sampling_options, torch_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in demo model (no download): image grid + control fidelity",
        description=(
            "Generate held-out cases with the shipped 64x64 shapes model, without and with its ControlNeXt module, "
            "write an image grid (condition | without control | with control) and print the control fidelity "
            "(edge F1 with a 2-pixel tolerance for edges, mask IoU for masks; 0..1, higher is better)."
        ),
    )
    p.add_argument("--output", "-o", default="controlnext-demo", help="output folder (default ./controlnext-demo)")
    p.add_argument("--condition", choices=("edges", "mask"), default="edges", help="condition type (default edges)")
    p.add_argument("--n", type=int, default=8, help="number of cases: prompts x 2 seeds (default 8)")
    add_sampling_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    from ..shapes.demo import demo_sampling, run_demo

    args.steps, args.guidance = demo_sampling(args.steps, args.guidance)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")

    with torch_threads(args.threads):
        res = run_demo(args.condition, args.output, n=args.n, steps=args.steps, guidance=args.guidance, start=t0)
    if res.model != "shipped":
        print(
            "WARNING: the shipped demo weights are not installed; using RANDOM untrained tiny models "
            "(the numbers are meaningless)."
        )
    metric = res.as_json()["metric"]
    print(f"{'case':<4} {'prompt':<44} {'seed':>4} {'without':>8} {'with':>8}")
    for i, c in enumerate(res.per_case):
        print(f"{i:<4} {c['prompt']:<44} {c['seed']:>4} {c['without_control']:>8.3f} {c['with_control']:>8.3f}")
    print(
        f"control fidelity ({metric}), mean over {len(res.per_case)} cases: "
        f"without control {res.without_control:.3f}, with control {res.with_control:.3f} "
        f"(ceiling {res.ceiling:.3f}: the metric on VAE-reconstructed ground-truth images)"
    )
    print(f"grid: {res.grid}  ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        payload = res.as_json()
        payload["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(payload))
    return 0
