"""`controlnext bench`: per-step time, peak memory, parameters and FLOPs vs the base model and ControlNet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import UserError

if TYPE_CHECKING:
    from ..bench import BenchConfig


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench.presets import PRESETS, ROW_NAMES

    presets = ", ".join(f"{n} ({p.description}, {p.resolution} px)" for n, p in PRESETS.items())
    p = sub.add_parser(
        "bench",
        help="benchmark ControlNeXt against the base model and ControlNet",
        description=(
            "Measure, in one interleaved run with random weights, the per-denoising-step time, peak memory, added "
            "and trainable parameters and FLOPs of the base model (UNet or transformer), the base with ControlNeXt "
            f"and the base with diffusers' ControlNet, with and without classifier-free guidance. Presets: {presets}."
        ),
    )
    p.add_argument("--preset", default="sd15-512", choices=list(PRESETS), help="model family and size")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line holding every number")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row in each round (default: preset's)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default: preset's)")
    p.add_argument("--warmup", type=int, default=0, help="untimed rounds first (the measuring pass warms up too)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: preset's)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(ROW_NAMES)}")
    p.add_argument(
        "--cfg", default="both", choices=["both", "on", "off"], help="classifier-free guidance: both modes, or one"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-measure", action="store_true", help="skip the FLOP and peak-memory pass")
    p.add_argument(
        "--flops-only", action="store_true", help="FLOPs and parameters only, models on the meta device (no time)"
    )
    p.add_argument("--docs", default=None, help="write/replace this run's section in a Markdown file")
    p.add_argument(
        "--from-json",
        default=None,
        metavar="FILE",
        help="do not run: read a saved --json output (its last line) and print/write it",
    )
    p.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="time torch.compile'd rows (e.g. inductor), each compiled with its hooks and timed on its own",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchResult, render_table, run_benchmark, update_docs

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        result = BenchResult.from_json(_last_json_line(Path(args.from_json)))
    else:
        result = run_benchmark(_config(args), progress=not args.quiet, log=log, docs=args.docs)
    print(f"{result.preset}: {result.resolution}px, {result.device}, {result.dtype}; {result.machine}; {result.date}")
    print(render_table(result))
    if args.docs:
        path = update_docs(args.docs, result)
        log(f"wrote the {result.preset} section of {path}")
    if args.json:
        print(result.to_json())
    return 0


def _last_json_line(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--from-json: no file at {path}")
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return line
    raise UserError(f"--from-json: {path} holds no JSON line (save the stdout of `controlnext bench --json`).")


def _config(args: argparse.Namespace) -> BenchConfig:
    from ..bench import BenchConfig

    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else None
    guidance = {"both": (False, True), "on": (True,), "off": (False,)}[args.cfg]
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    config = BenchConfig(
        preset=args.preset,
        resolution=args.resolution,
        rows=rows,
        guidance=guidance,
        repeats=args.repeats,
        steps=args.steps,
        warmup=args.warmup,
        measure=not args.no_measure,
        flops_only=args.flops_only,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        seed=args.seed,
        compile=args.compile,
    )
    try:
        return config.resolved()
    except ValueError as err:
        raise UserError(str(err)) from err
