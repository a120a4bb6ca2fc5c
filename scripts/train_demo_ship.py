#!/usr/bin/env python
# ruff: noqa: E501  (the model-card templates are Markdown tables, one row per line)
"""Copy trained demo weights into the package, measure them, and write their model cards.

``python scripts/train_demo_ship.py BUILD`` expects ``BUILD/base`` (``scripts/train_base.py``) and
``BUILD/edges``, ``BUILD/mask`` (``controlnext train`` outputs). It writes ``src/controlnext/assets/demo/`` and a
``metrics.json`` beside the cards. Metrics (held-out shapes seed 1234, DPM-Solver++ with the demo's
steps and guidance, ``DEMO_STEPS`` and ``DEMO_GUIDANCE``):

* base: the fraction of generated images whose shape colour, shape kind and background colour, read back by
  :func:`controlnext.shapes.analysis.describe`, match the caption (and the same reader's accuracy on ground truth);
* modules: control fidelity with and without control (:mod:`controlnext.shapes.metrics`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from controlnext.shapes.demo import DEMO_GUIDANCE, DEMO_STEPS

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "controlnext" / "assets" / "demo"
MODULE_FILES = ("controlnext.safetensors", "unet_weight_increasements.safetensors")
BASE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def base_accuracy(base: Path, n: int, steps: int, guidance: float) -> dict:
    from diffusers import StableDiffusionPipeline

    from controlnext.shapes import render_sample
    from controlnext.shapes.analysis import describe
    from controlnext.shapes.demo import DEMO_SEED

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    samples = [render_sample(DEMO_SEED, 10_000 + i) for i in range(n)]
    hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    truth = {"colour": 0, "shape": 0, "background": 0}
    per_shape: dict[str, list[int]] = {}  # asked shape -> [drawn as asked, asked]
    for i in range(0, n, 16):
        chunk = samples[i : i + 16]
        gens = [torch.Generator().manual_seed(j) for j in range(i, i + len(chunk))]
        out = pipe(
            [s.caption for s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        ).images
        for s, img in zip(chunk, out):
            c, sh, b = describe((img * 255).round().astype(np.uint8))
            ok = (c == s.meta["colour"], sh == s.meta["shape"], b == s.meta["background"])
            for k, v in zip(("colour", "shape", "background"), ok):
                hits[k] += v
            hits["all"] += all(ok)
            counts = per_shape.setdefault(s.meta["shape"], [0, 0])
            counts[0] += ok[1]
            counts[1] += 1
            c, sh, b = describe(s.image)
            for k, v in zip(("colour", "shape", "background"), (c, sh, b)):
                truth[k] += v == s.meta[k]
    return {
        "n": n,
        "generated": {k: round(v / n, 3) for k, v in hits.items()},
        "reader_on_ground_truth": {k: round(v / n, 3) for k, v in truth.items()},
        "shape_hits": {k: f"{a}/{b}" for k, (a, b) in sorted(per_shape.items())},
    }


def module_fidelity(assets: Path, condition: str, n: int, steps: int, guidance: float) -> dict:
    from controlnext.shapes.demo import demo_cases, load_demo_pipeline
    from controlnext.shapes.metrics import evaluate_pipeline

    pipe, _ = load_demo_pipeline(condition, allow_random=False, root=assets)
    prompts, conds, seeds = demo_cases(n, condition)
    report, _, _ = evaluate_pipeline(pipe, prompts, conds, condition, seeds, steps, guidance)
    per = np.array(report.with_control) - np.array(report.without_control)
    return dict(report.as_dict(), gain_min=round(float(per.min()), 4), with_min=round(min(report.with_control), 4))


MEASURED = "## Measured"  # where the base card's measured part starts (rewritten by --modules-only)


def base_card(info: dict, acc: dict, size_mb: float) -> str:
    """The base's model card: what it is and how it was trained (from its training.json), then ``base_measured``."""
    # A base trained in two runs (constant LR, then a cosine anneal with --init) records the first in "init".
    stages = [info["init"], info] if isinstance(info.get("init"), dict) else [info]
    first = stages[0]
    runs = "; then ".join(
        f"{st['unet_steps']} steps at {'a cosine-annealed' if st.get('lr_schedule') == 'cosine' else 'a constant'} "
        f"LR {st['lr']} (data seed {st['seed']})"
        for st in stages
    )
    minutes = sum(st["total_seconds"] for st in stages) / 60
    commands = "\n".join(st["command"] for st in stages)
    return f"""# controlnext demo base: a 64x64 "shapes" text-to-image model

A small Stable Diffusion-layout model (diffusers `StableDiffusionPipeline` folder: `vae/`, `text_encoder/`,
`tokenizer/`, `unet/`, `scheduler/`) that draws one coloured shape on a plain background from captions like
"a red star on a blue background". It exists so that the library's demo, tests and benchmarks run real code paths
offline. Trained from scratch on CPU; {size_mb:.1f} MB of safetensors.

| part | what |
|---|---|
| data | procedural shapes (`controlnext.shapes.world`): 5 shapes x 8 colours x 7 backgrounds, random size, position, rotation; {info["n_train"]} samples per UNet run |
| VAE | `AutoencoderKL`, 3 blocks (32, 64, 64), 4x factor: 64x64x3 <-> 16x16x4; {first["vae_steps"]} steps on 32x32 crops; held-out PSNR {first["vae_psnr_db"]} dB |
| text encoder | CLIP text model, 2 layers, width 64, word-level vocabulary (every caption word one token), 16 tokens; trained jointly with the UNet |
| UNet | `UNet2DConditionModel` (32, 64, 64), cross-attention at 8x8 and 4x4; v-prediction, DDPM linear betas, Min-SNR-5 weighting, 10 % empty captions |
| training | {runs}; batch {info["batch"]}, AdamW, EMA {info["ema"]} (saved), {info["threads"]} CPU thread; {minutes:.0f} min wall time in total |
| scheduler | `DPMSolverMultistepScheduler` (the demo samples {DEMO_STEPS} steps at guidance {DEMO_GUIDANCE:g}) |

## Reproduce

```
{commands}
```

(see `docs/demo.md`; bit-for-bit deterministic on CPU for a given thread count and CPU model).

""" + base_measured(acc)


def base_measured(acc: dict) -> str:
    """The base card's measured part: caption accuracy of generated images at the demo's sampling settings."""
    g, t = acc["generated"], acc["reader_on_ground_truth"]
    per_shape = ", ".join(f"{k} {v}" for k, v in acc.get("shape_hits", {}).items())
    return f"""{MEASURED} (held-out captions, shapes seed 1234, {DEMO_STEPS} steps, guidance {DEMO_GUIDANCE:g}, {acc["n"]} images)

The generated image is read back with `controlnext.shapes.analysis.describe` (background = border median, shape =
foreground median, kind from the silhouette's solidity / hull vertices / circularity):

| attribute | matches the caption | reader accuracy on ground-truth renders |
|---|---|---|
| shape colour | {g["colour"]:.0%} | {t["colour"]:.0%} |
| shape kind | {g["shape"]:.0%} | {t["shape"]:.0%} |
| background colour | {g["background"]:.0%} | {t["background"]:.0%} |
| all three | {g["all"]:.0%} | |

Chance levels: colour 1/8, shape 1/5, background 1/7. Shape kind drawn as asked, per asked shape: {per_shape}.
"""


def _structure(summary: dict) -> str:
    c = json.loads(summary["config"]["controlnext_config"])
    blocks = c["block_out_channels"]
    grid = "1/4 of the condition, the latent grid of this VAE" if len(blocks) == 1 else "1/8 of the condition"
    return f"stem {tuple(c['embedding_channels'])}, blocks {tuple(blocks)}, features at {grid}"


def module_card(condition: str, summary: dict, fid: dict, size_mb: float, command: str) -> str:
    metric = "mask IoU" if condition == "mask" else "edge F1 with a 2-pixel tolerance"
    tr = summary["trainable"]
    return f"""# controlnext demo module: {condition}

A ControlNeXt control module for the demo base (`../base`): condition = {"Canny edges (per-channel, 50/150)" if condition == "edges" else "the shape's silhouette mask"}, white on black, 64x64.
Shipped as the releases ship theirs: `controlnext.safetensors` ({size_mb:.2f} MB, the published key layout with its
config in the metadata) and `unet_weight_increasements.safetensors`, the deltas of the trained UNet subset (the
attention output projections, `to_out`, as the published SD1.5 recipe trains). `controlnext.shapes.demo` loads both
with the code used for published releases (`load_controlnext`, then the pipeline's `load_unet_weights`).

| | |
|---|---|
| structure | `sd15-training` variant (injected after down block 0, Cross Normalization, pool first) with fewer channels: {_structure(summary)} |
| trainable | control module ({tr["control"]:,} parameters) plus the UNet's `to_out` layers ({tr["unet"]:,} parameters in {tr["unet_tensors"]} tensors, shipped as deltas); "without control" uses the base UNet |
| data | `controlnext make-dataset --n 4000 --seed 1 --condition {condition}` |
| training | `controlnext train`: {summary["steps"]} steps, batch {summary["config"]["train_batch_size"]}, lr {summary["config"]["learning_rate"]} (UNet {summary["config"]["unet_learning_rate"]}), caption dropout {summary["config"]["caption_dropout"]}, seed {summary["config"]["seed"]}, CPU; {summary["seconds"] / 60:.1f} min |
| final training loss | {summary["final_loss"]:.4f} |

## Control fidelity ({metric}; {fid["n"]} held-out cases, shapes seed 1234, {DEMO_STEPS} steps, guidance {DEMO_GUIDANCE:g})

| | fidelity |
|---|---|
| with control (scale 1) | **{fid["with_control"]:.3f}** |
| without control (same seeds, scale 0) | {fid["without_control"]:.3f} |

## Reproduce

```
{command}
```
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build", type=Path, help="folder with base/, edges/ and mask/")
    p.add_argument("--n-base", type=int, default=64)
    p.add_argument("--modules-only", action="store_true", help="ship new modules for the base already in --assets")
    p.add_argument("--n-fidelity", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--assets", type=Path, default=ASSETS, help="destination (default: the package's; another folder for a check)"
    )
    args = p.parse_args(argv)
    assets = args.assets
    torch.set_num_threads(args.threads)
    t0 = time.time()

    # 1. Copy the weights (only what a pipeline loads).
    dst = assets / "base"
    if not args.modules_only:
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for part in BASE_PARTS:
            src = args.build / "base" / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / part)
    for cond in ("edges", "mask"):
        (assets / cond).mkdir(parents=True, exist_ok=True)
        for name in MODULE_FILES:
            shutil.copy2(args.build / cond / name, assets / cond / name)

    # 2. Measure and write the cards.
    acc = base_accuracy(dst, args.n_base, DEMO_STEPS, DEMO_GUIDANCE)
    print("base", json.dumps(acc), flush=True)
    if args.modules_only:  # the base was not rebuilt: its card keeps its training part, the measured part is new
        card = (dst / "README.md").read_text()
        (dst / "README.md").write_text(card[: card.index(MEASURED)] + base_measured(acc))
    else:
        info = json.loads((args.build / "base" / "training.json").read_text())
        size = sum(f.stat().st_size for f in dst.rglob("*.safetensors")) / 2**20
        (dst / "README.md").write_text(base_card(info, acc, size))
    metrics = {"base": acc}
    for cond in ("edges", "mask"):
        summary = json.loads((args.build / cond / "train_summary.json").read_text())
        fid = module_fidelity(assets, cond, args.n_fidelity, DEMO_STEPS, DEMO_GUIDANCE)
        print(cond, json.dumps(fid), flush=True)
        metrics[cond] = fid
        cmd_file = args.build / cond / "command.txt"
        # command.txt is bash `printf %q` output; re-quote it in the readable single-quote style.
        command = shlex.join(shlex.split(cmd_file.read_text())) if cmd_file.is_file() else "see docs/demo.md"
        msize = (assets / cond / "controlnext.safetensors").stat().st_size / 2**20
        (assets / cond / "README.md").write_text(module_card(cond, summary, fid, msize, command))
    (assets / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    total = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file()) / 2**20
    print(f"shipped {total:.1f} MB to {assets} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
