"""`controlnext eval`: control fidelity of ControlNeXt, ControlNet or T2I-Adapter on a base model, with and without
the control, on the shapes world or a MultiGen-20M-style split (the ControlNet++ protocol)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cli import UserError
from ..sources import require_model_source
from . import add_sampling_options, deprecated_alias, spelled_as
from .generate import DTYPES

_METHODS = ("controlnext", "controlnet", "t2i-adapter")  # = evaluation.METHODS, kept here so --help stays light
_CONDITIONS = ("edges", "mask", "canny", "hed", "depth", "seg")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure control fidelity (shapes metrics, ControlNet++ protocol) of control models on a base model",
        description=(
            "Generate images for (prompt, condition) pairs with and without control and score how well they follow "
            "the condition. On the shapes world (the default, or --data from `controlnext make-dataset`): edge F1 "
            "with a pixel tolerance (edges) or mask IoU (mask), 0..1. On a MultiGen-20M-style split (imagefolder "
            "with metadata.jsonl, or parquet, with image, condition and caption columns) the ControlNet++ metrics: "
            "Canny F1, HED MS-SSIM, depth RMSE, ADE20K mIoU, CLIP score, FID; each annotator model is a local path, "
            "and a metric whose model is not given is skipped (and reported as skipped). Several "
            "--method/--controlnext pairs are compared in one table. Without --model/--controlnext the shipped demo "
            "model is evaluated."
        ),
    )
    p.add_argument(
        "--model",
        dest="base",
        default=None,
        help="base model folder (diffusers SD layout) or demo; default: the shipped one",
    )
    deprecated_alias(p, "--base", "--model", dest="base")
    p.add_argument(
        "--method",
        action="append",
        choices=_METHODS,
        default=None,
        help="control method of the --controlnext at the same position (repeatable; default controlnext)",
    )
    p.add_argument(
        "--controlnext",
        dest="module",
        action="append",
        default=None,
        help="control model (repeatable): a ControlNeXt file/folder or zoo name (`controlnext models`), a diffusers "
        "ControlNetModel / T2IAdapter folder, or demo:edges / demo:mask; default: the shipped ControlNeXt module",
    )
    deprecated_alias(p, "--module", "--controlnext", dest="module", append=True)
    p.add_argument(
        "--unet-weights", default=None, help="trained UNet subset (values or deltas) that goes with the module"
    )
    p.add_argument(
        "--condition",
        choices=_CONDITIONS,
        default=None,
        help="condition type (default: from DATA/dataset.json, else edges)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="evaluation split: imagefolder with metadata.jsonl, or a .parquet file / folder of them",
    )
    p.add_argument(
        "--condition-column",
        default=None,
        help="the split's condition column (default: found by name); the image column derives the condition "
        "from the image (Canny 100/200, HED, depth), as the protocol does for MultiGen-20M Canny and HED",
    )
    p.add_argument("--label-column", default=None, help="segmentation label column for mIoU (default: seg_map/label)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="bring the split to RES x RES (shorter side resized, centre crop; default: as stored)",
    )
    p.add_argument("--n", type=int, default=32, help="number of cases (default 32)")
    add_sampling_options(p)
    p.add_argument(
        "--protocol",
        choices=("controlnet++",),
        default=None,
        help="use the protocol's sampling settings (controlnet++: 20 steps, guidance 7.5, 4 images per condition) "
        "where --steps/--guidance/--images-per-condition are not given",
    )
    p.add_argument("--images-per-condition", type=int, default=None, help="images per condition (default 1)")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics (default: all that apply to the condition): edge-f1, mask-iou, canny-f1, "
        "hed-ms-ssim, depth-rmse, seg-miou, clip-score, fid",
    )
    p.add_argument("--hed-model", default=None, help="local ControlNetHED.pth (for hed-ms-ssim)")
    p.add_argument("--depth-model", default=None, help="local transformers depth-estimation folder (for depth-rmse)")
    p.add_argument("--seg-model", default=None, help="local transformers ADE20K segmentation folder (for seg-miou)")
    p.add_argument("--clip-model", default=None, help="local transformers CLIP folder (for clip-score)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception file (for fid)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--control-scale", dest="scale", type=float, default=1.0,
                   help="control scale for the 'with control' run (default 1)")  # fmt: skip
    deprecated_alias(p, "--scale", "--control-scale", dest="scale", type=float)
    p.add_argument("--tolerance", type=float, default=2.0, help="edge matching tolerance in pixels (default 2)")
    p.add_argument(
        "--output", "-o", type=Path, default=None, help="also write a grid PNG, a markdown table and a JSON here"
    )
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> tuple[int, float, int]:
    from ..evaluation import PROTOCOLS
    from ..shapes.demo import DEMO_GUIDANCE, DEMO_STEPS

    proto = PROTOCOLS.get(args.protocol, {"steps": DEMO_STEPS, "guidance": DEMO_GUIDANCE, "images_per_condition": 1})
    steps = proto["steps"] if args.steps is None else args.steps
    guidance = proto["guidance"] if args.guidance is None else args.guidance
    per = proto["images_per_condition"] if args.images_per_condition is None else args.images_per_condition
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if per < 1:
        raise UserError(f"--images-per-condition must be at least 1, got {per}")
    return steps, guidance, per


def _zoo_module(args: argparse.Namespace, name: str) -> str:
    """A zoo name's cached module file (its UNet file becomes --unet-weights unless one is given); else ``name``."""
    from ..zoo import get_entry, resolve

    if get_entry(name) is None:
        return name
    _, module, unet = resolve(name)
    args.unet_weights = args.unet_weights or (str(unet) if unet else None)
    return str(module)


def _methods(args: argparse.Namespace, kind: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(base folder or None for the shipped pipeline, [(method, module path)])."""
    from ..shapes.demo import demo_assets, demo_ref

    methods, modules = args.method or ["controlnext"], args.module or []
    modules = [str(ref[1]) if (ref := demo_ref(m)) else _zoo_module(args, m) for m in modules]
    if args.base is not None and (ref := demo_ref(args.base)) is not None:
        args.base = str(ref[0])
    assets = demo_assets()
    if not modules:
        if methods != ["controlnext"]:
            raise UserError(f"--method {' '.join(methods)} needs a --controlnext for each method (in the same order)")
        if assets is None:
            raise UserError("the shipped demo model is not installed: pass --model and --controlnext")
        modules = [str(assets / kind / "controlnext.safetensors")]
    if len(methods) == 1 and len(modules) > 1:
        methods = methods * len(modules)
    if len(methods) != len(modules):
        raise UserError(f"got {len(methods)} --method for {len(modules)} --controlnext: give one method per module")
    if args.unet_weights and "controlnext" not in methods:
        raise UserError("--unet-weights goes with a ControlNeXt module; none of the methods is controlnext")
    if args.base is not None:
        require_model_source(args.base, spelled_as(args, "base", "--model"))
    base = args.base or (str(assets / "base") if assets else None)
    if base is None:
        raise UserError("the shipped demo model is not installed: pass --model")
    return base, list(zip(methods, modules))


def _shipped(kind: str, unet_weights: str | None, device: str, dtype):
    from ..shapes.demo import load_demo_pipeline

    pipe = load_demo_pipeline(kind, allow_random=False)[0]
    if unet_weights:
        pipe.load_unet_weights(unet_weights, keep_base=True)
    return pipe.to(device=device, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.scale <= 0:
        raise UserError(f"--control-scale must be above 0 (0 is the 'without control' run), got {args.scale}")
    import numpy as np
    import torch

    from ..evaluation import METRICS, EvalModels, applicable_metrics, evaluate_methods, load_method, markdown_table
    from ..evaluation.data import read_split
    from ..evaluation.protocol import derive_condition
    from ..shapes.demo import _demo_samples, demo_cases

    steps, guidance, per = _settings(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = "float16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, DTYPES[args.dtype] if args.dtype else default_dtype)
    models = EvalModels(args.hed_model, args.depth_model, args.seg_model, args.clip_model, args.inception, device)
    references = labels = None
    if args.data is not None:
        split = read_split(args.data, args.n, args.condition_column, args.label_column, args.resolution)
        kind = args.condition or split.kind or "edges"
        prompts, conds, seeds = split.prompts, split.conditions, list(range(len(split.prompts)))
        references, labels = split.images, split.labels
        if split.columns["condition"] == split.columns["image"]:
            conds = [derive_condition(kind, im, models) for im in conds]
    else:
        kind = args.condition or "edges"
        if args.resolution is not None:
            raise UserError("--resolution applies to a --data split; the shapes world is 64 px")
        if kind not in ("edges", "mask"):
            raise UserError(f"the shapes world has edges and mask conditions; --condition {kind} needs --data")
        prompts, conds, seeds = demo_cases(args.n, kind)
        references = [s.image for s in _demo_samples(args.n)]
    names = applicable_metrics(kind) if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    base, pairs = _methods(args, kind)
    shipped = args.base is None and args.module is None

    def factory(method: str, module: str):
        if shipped:
            return lambda: _shipped(kind, args.unet_weights, device, dtype)
        weights = args.unet_weights if method == "controlnext" else None
        return lambda: load_method(method, base, module, weights, device, dtype)

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results, skipped, images = evaluate_methods(
            [(m, mod, factory(m, mod)) for m, mod in pairs],
            prompts,
            [np.asarray(c, np.uint8) for c in conds],
            seeds,
            kind,
            names,
            models,
            steps,
            guidance,
            args.scale,
            per,
            references,
            labels,
            args.tolerance,
            progress=True,
        )
    finally:
        torch.set_num_threads(previous)
    table = markdown_table(results, names, skipped)
    print(table, end="")
    first = results[0]
    shapes_metric = {"edges": "edge-f1", "mask": "mask-iou"}.get(kind)
    metric_title = "mask IoU" if kind == "mask" else f"edge F1 ({args.tolerance:g} px tolerance)"
    payload: dict = {}
    if shapes_metric in first.with_control:
        fw, fo = first.with_control[shapes_metric], first.without_control[shapes_metric]
        if len(results) == 1:  # with several methods the table says it all
            print(
                f"control fidelity ({metric_title}) over {len(prompts)} cases: "
                f"without control {fo:.3f}, with control (scale {args.scale:g}) {fw:.3f}"
            )
        payload = {"fidelity": {"with_control": round(fw, 4), "without_control": round(fo, 4)}, "metric": metric_title}
    payload.update(
        condition=kind,
        n=len(prompts),
        base=base,
        module=pairs[0][1],
        protocol=args.protocol,
        steps=steps,
        guidance=guidance,
        images_per_condition=per,
        scale=args.scale,
        methods=[r.as_dict() for r in results],
        skipped=skipped,
    )
    if args.output is not None:
        from ..shapes.demo import save_grid

        args.output.mkdir(parents=True, exist_ok=True)
        with_, without = images[f"{first.method}:{first.module}"]
        grid_metric = shapes_metric or next(iter(first.per_condition), None)
        per_case = first.per_condition.get(grid_metric, {})
        scores = list(zip(per_case["without"], per_case["with"])) if per_case else None
        title = metric_title if shapes_metric else (METRICS[grid_metric].title if grid_metric else "")
        shown = slice(None, None, per)  # the first image of each condition
        grid = None
        if len({np.asarray(c).shape for c in conds}) == 1:  # a grid needs one cell size
            grid = save_grid(
                args.output / f"eval_{kind}.png", conds, without[shown], with_[shown], scores=scores, metric=title,
                settings={"command": "eval", "model": base, "module": first.module, "method": first.method,
                          "condition": kind, "n": len(prompts), "steps": steps, "guidance": guidance,
                          "control_scale": args.scale, "seeds": list(seeds)},
            )  # fmt: skip
        cases = [
            {"prompt": p, **{f"{m}_{s}": round(v[s][i], 4) for m, v in first.per_condition.items() for s in v}}
            for i, p in enumerate(prompts)
        ]
        if per_case and shapes_metric:
            for case, (wo, w) in zip(cases, scores):
                case.update(with_control=w, without_control=wo)
        (args.output / f"eval_{kind}.md").write_text(table)
        (args.output / f"eval_{kind}.json").write_text(json.dumps(dict(payload, cases=cases), indent=2) + "\n")
        print(f"grid: {grid or 'none (the conditions differ in size)'}\ntable: {args.output / f'eval_{kind}.md'}")
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(payload))
    return 0
