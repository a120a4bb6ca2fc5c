"""`controlnext eval`: control fidelity of a ControlNeXt module on a base model, with and without the control."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cli import UserError
from ..sources import require_model_source
from . import add_sampling_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure control fidelity (edge F1 / mask IoU) of a module on a base model",
        description=(
            "Generate images for (prompt, condition) pairs with and without the module and score how well they follow "
            "the condition: edge F1 with a pixel tolerance (edges) or mask IoU of the segmented object (mask); "
            "0..1, higher is better. Pairs come from --data (an imagefolder with metadata.jsonl holding "
            "conditioning_image_file_name and text, as written by `controlnext make-dataset`) or, by default, "
            "from held-out procedural shapes. Without --base/--module the shipped demo model is evaluated."
        ),
    )
    p.add_argument("--base", default=None, help="base model folder (diffusers SD layout); default: the shipped one")
    p.add_argument("--module", default=None, help="ControlNeXt module (file or folder); default: the shipped one")
    p.add_argument(
        "--unet-weights", default=None, help="trained UNet subset (values or deltas) that goes with the module"
    )
    p.add_argument(
        "--condition",
        choices=("edges", "mask"),
        default=None,
        help="condition type (default: from DATA/dataset.json, else edges)",
    )
    p.add_argument("--data", type=Path, default=None, help="evaluation data folder (imagefolder with metadata.jsonl)")
    p.add_argument("--n", type=int, default=32, help="number of cases (default 32)")
    add_sampling_options(p)
    p.add_argument("--scale", type=float, default=1.0, help="control scale for the 'with control' run (default 1)")
    p.add_argument("--tolerance", type=float, default=2.0, help="edge matching tolerance in pixels (default 2)")
    p.add_argument("--output", "-o", type=Path, default=None, help="also write a grid PNG and per-case JSON here")
    p.set_defaults(func=run)


def _read_data(folder: Path, n: int) -> tuple[list[str], list, str | None]:
    import numpy as np
    from PIL import Image

    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(
            f"{folder} has no metadata.jsonl (expected the imagefolder layout of `controlnext make-dataset`)"
        )
    prompts, conds = [], []
    for line_no, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        name = row.get("conditioning_image_file_name") or row.get("conditioning_image")
        if name is None or "text" not in row:
            raise UserError(f"{meta}:{line_no}: needs 'conditioning_image_file_name' and 'text' fields")
        path = folder / name
        if not path.is_file():
            raise UserError(f"{meta}:{line_no}: condition image {path} does not exist")
        prompts.append(row["text"])
        conds.append(np.asarray(Image.open(path).convert("RGB")))
        if len(prompts) == n:
            break
    kind = None
    if (folder / "dataset.json").is_file():
        kind = json.loads((folder / "dataset.json").read_text()).get("condition")
    return prompts, conds, kind


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    from ..loading import load_controlnext
    from ..pipelines import StableDiffusionControlNeXtPipeline
    from ..shapes.demo import demo_assets, demo_cases, load_demo_pipeline
    from ..shapes.metrics import evaluate_pipeline

    kind = args.condition
    if args.data is not None:
        prompts, conds, data_kind = _read_data(args.data, args.n)
        if not prompts:
            raise UserError(f"{args.data}/metadata.jsonl has no rows")
        kind = kind or data_kind or "edges"
        seeds = list(range(len(prompts)))
    else:
        kind = kind or "edges"
        prompts, conds, seeds = demo_cases(args.n, kind)
    assets = demo_assets()
    base = args.base or (str(assets / "base") if assets else None)
    module_path = args.module or (str(assets / kind / "controlnext.safetensors") if assets else None)
    if base is None or module_path is None:
        raise UserError("the shipped demo model is not installed: pass --base and --module")
    if args.base is not None:
        require_model_source(args.base, "--base")
    import torch

    if args.base is None and args.module is None and assets:
        pipe, _ = load_demo_pipeline(kind, allow_random=False)
    else:
        pipe = StableDiffusionControlNeXtPipeline.from_pretrained(base, controlnext=load_controlnext(module_path))
    if args.unet_weights:
        pipe.load_unet_weights(args.unet_weights)

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report, with_, without = evaluate_pipeline(
            pipe,
            prompts,
            conds,
            kind,
            seeds,
            args.steps,
            args.guidance,
            args.scale,
            tolerance=args.tolerance,
            progress=True,
        )
    finally:
        torch.set_num_threads(previous)
    metric = "mask IoU" if kind == "mask" else f"edge F1 ({args.tolerance:g} px tolerance)"
    print(
        f"control fidelity ({metric}) over {len(prompts)} cases: "
        f"without control {report.mean_without:.3f}, with control (scale {args.scale:g}) {report.mean_with:.3f}"
    )
    payload = {
        "fidelity": {"with_control": round(report.mean_with, 4), "without_control": round(report.mean_without, 4)},
        "metric": metric,
        "condition": kind,
        "n": len(prompts),
        "base": base,
        "module": module_path,
    }
    if args.output is not None:
        from ..shapes.demo import save_grid

        scores = list(zip(report.without_control, report.with_control))
        grid = save_grid(args.output / f"eval_{kind}.png", conds, without, with_, scores=scores, metric=metric)
        cases = [
            {"prompt": p, "with_control": a, "without_control": b}
            for p, a, b in zip(prompts, report.with_control, report.without_control)
        ]
        (args.output / f"eval_{kind}.json").write_text(json.dumps(dict(payload, cases=cases), indent=2) + "\n")
        print(f"grid: {grid}")
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(payload))
    return 0
