#!/usr/bin/env python
"""Convergence study: ControlNeXt (Cross Normalization) vs ControlNeXt (zero-conv) vs diffusers ControlNet.

Same frozen base (the shipped shapes model by default), same training data, same data order, noise and timesteps
(one seeded generator per run), same batch size, optimiser, LR and step budget for every method; only the control
method differs (the training loop is ``scripts/train_demo_controlnext.py``'s, shared with the demo modules):

* ``cross_norm``: ControlNeXt module (demo size, ``sd15-training`` structure), injected after down block 0 with
  Cross Normalization;
* ``zero_conv``: the same module with the paper's ablation (a zero-initialised 1x1 conv instead of the normalisation);
* ``controlnet``: ``diffusers.ControlNetModel.from_unet(base_unet)`` (a trainable copy of the UNet encoder with zero
  convolutions on every skip), residuals passed to the frozen UNet, as diffusers' ``train_controlnet.py`` does.

Every ``--eval-every`` steps the control fidelity (:mod:`controlnext.evaluation`: edge F1 with a 2 px tolerance, or
mask IoU) is measured on ``--eval-n`` held-out (prompt, condition) cases, sampled with the same scheduler, steps,
guidance and seeds for every method. Each method runs in its own subprocess so that peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is its own. Writes ``docs/convergence.md`` (table, machine, date, steps
to reach ``--threshold``), ``docs/convergence.png`` and the raw ``benchmarks/results/convergence.json``.

Usage: ``python benchmarks/convergence.py --steps 400 --eval-every 50`` (about 20 minutes on 1 CPU thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from controlnext.bench import machine_description

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "cross_norm": "ControlNeXt (cross-norm)",
    "zero_conv": "ControlNeXt (zero-conv)",
    "controlnet": "ControlNet (diffusers)",
}


def _loop_module():
    spec = importlib.util.spec_from_file_location(
        "train_demo_controlnext", ROOT / "scripts" / "train_demo_controlnext.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


@torch.no_grad()
def sample(loop, method, base, prompts, conds, seeds, steps: int, guidance: float) -> list[np.ndarray]:
    """DPM-Solver++ sampling with classifier-free guidance (control on both halves, as the pipelines do)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_pretrained(base.path, subfolder="scheduler")
    sched.set_timesteps(steps)
    n = len(prompts)
    shape = (4, base.unet.config.sample_size, base.unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = x * sched.init_noise_sigma
    emb = torch.cat([base.embed([""] * n), base.embed(list(prompts))])
    cond = torch.cat([conds, conds]) if conds is not None else None
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        tt = t.expand(2 * n)
        eps = base.unet(xin, tt, emb).sample if method is None else method.predict(xin, tt, emb, cond)
        u, c = eps.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    img = base.vae.decode(x / base.vae.config.scaling_factor).sample
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(img)


def run_method(args) -> dict:
    """Train one method (in this process) and return its record."""
    from controlnext.data.shapes import condition_image, render_sample
    from controlnext.evaluation import mean_fidelity

    torch.set_num_threads(args.threads)
    loop = _loop_module()
    base = loop.load_base(args.base)
    # Encoded once per (base, condition, n, seed) and shared by the methods' subprocesses.
    tag = f"{Path(args.base).resolve().as_posix().replace('/', '_')}-{args.condition}-{args.n}-{args.data_seed}"
    cache = ROOT / "build" / "convergence-cache" / f"{hashlib.sha1(tag.encode()).hexdigest()[:16]}.pt"
    data = loop.prepare_data(base, args.condition, args.n, args.data_seed, cache=cache)
    cases = [render_sample(args.eval_seed, i) for i in range(args.eval_n)]
    prompts = [s.caption for s in cases]
    cond_np = [condition_image(s, args.condition) for s in cases]
    conds = torch.from_numpy(np.stack(cond_np)).permute(0, 3, 1, 2).float() / 255.0
    seeds = list(range(args.eval_n))
    rss_before = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    method = loop.Method(args.method, base, seed=args.seed)
    n_params = sum(p.numel() for p in method.params)
    history: list[dict] = []

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        imgs = sample(loop, method, base, prompts, conds, seeds, args.eval_steps, args.guidance)
        fid = float(np.mean(mean_fidelity(imgs, cond_np, args.condition)))
        history.append({"step": step, "fidelity": round(fid, 4)})
        print(f"[{args.method}] step {step}: fidelity {fid:.3f} (eval {time.perf_counter() - t0:.1f} s)", flush=True)

    stats = loop.train(
        method, data, args.steps, args.batch, args.lr, args.seed, callback=evaluate, callback_every=args.eval_every
    )
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "method": args.method,
        "prediction_type": base.prediction_type,
        "trainable_parameters": n_params,
        "seconds_per_step": round(stats["seconds_per_step"], 4),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_before_training_mb": round(rss_before, 1),
        "peak_gpu_mb": peak_gpu,
        "history": history,
        "final_loss_avg": stats["final_loss_avg"],
        "losses": [round(x, 5) for x in stats["losses"]],
    }


def baseline(args) -> float:
    """Fidelity of the base model alone (no control) on the same cases and seeds."""
    from controlnext.data.shapes import condition_image, render_sample
    from controlnext.evaluation import mean_fidelity

    loop = _loop_module()
    base = loop.load_base(args.base)
    cases = [render_sample(args.eval_seed, i) for i in range(args.eval_n)]
    imgs = sample(
        loop, None, base, [s.caption for s in cases], None, range(args.eval_n), args.eval_steps, args.guidance
    )
    return float(np.mean(mean_fidelity(imgs, [condition_image(s, args.condition) for s in cases], args.condition)))


def steps_to(history: list[dict], threshold: float) -> int | None:
    return next((h["step"] for h in history if h["fidelity"] >= threshold), None)


def machine() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{machine_description(device)}; torch {torch.__version__}; Python {platform.python_version()}"


def write_report(args, results: list[dict], base_fid: float, wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = ROOT / "docs"
    loop_target = results[0].get("prediction_type", "epsilon").replace("_prediction", "")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for r in results:
        ax.plot(
            [h["step"] for h in r["history"]],
            [h["fidelity"] for h in r["history"]],
            marker="o",
            ms=3,
            label=f"{LABELS[r['method']]} ({r['trainable_parameters'] / 1e6:.2f} M params)",
        )
    ax.axhline(base_fid, color="grey", ls=":", label="base model, no control")
    ax.axhline(args.threshold, color="black", ls="--", lw=0.8, label=f"threshold {args.threshold:g}")
    metric = "edge F1 (2 px tolerance)" if args.condition == "edges" else "mask IoU"
    ax.set_xlabel(f"training step (batch {args.batch})")
    ax.set_ylabel(f"control fidelity: {metric}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Convergence on shapes/{args.condition} (lr {args.lr:g}, same data, seeds, budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(docs / "convergence.png")

    date = dt.date.today().isoformat()
    lines = [
        "# Convergence study: Cross Normalization vs zero-convolution vs ControlNet",
        "",
        f"Measured {date} on {machine()}, {args.threads} thread(s); whole study {wall / 60:.1f} min.",
        f"Reproduce: `{args.command}`.",
        "",
        "Setup (identical for every method): frozen shipped shapes base (64x64, 16x16x4 latents); "
        f"{args.n} training samples (shapes seed {args.data_seed}, `{args.condition}` condition); batch {args.batch}; "
        f"AdamW lr {args.lr:g} (50-step warm-up, weight decay 0.01, grad clip 1); caption dropout 0.1; "
        f"{loop_target} MSE at uniform timesteps; one seeded generator (seed {args.seed}) drives data order, noise and "
        "timesteps; only the control method's own parameters train (base UNet frozen for all three). "
        f"Fidelity: {metric} on {args.eval_n} held-out cases (shapes seed {args.eval_seed}), DPM-Solver++ "
        f"{args.eval_steps} steps, guidance {args.guidance:g}, fixed sampling seeds. "
        f"Base model alone (no control): **{base_fid:.3f}**.",
        "",
        f"| method | trainable params | s/step | peak RSS (MB) | steps to fidelity >= {args.threshold:g} | "
        f"fidelity @ {args.steps} steps | best fidelity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h = r["history"]
        reach = steps_to(h, args.threshold)
        lines.append(
            f"| {LABELS[r['method']]} | {r['trainable_parameters']:,} | {r['seconds_per_step']:.3f} | "
            f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_training_mb']:.0f} over base+data) | "
            f"{reach if reach is not None else f'not within {args.steps}'} | {h[-1]['fidelity']:.3f} | "
            f"{max(x['fidelity'] for x in h):.3f} |"
        )
    lines += [
        "",
        "s/step: training steps only (evaluation excluded). Peak RSS: the method's own process (base, data and "
        "training); the bracket is the growth over the RSS reached before training, which for the first method "
        "run includes encoding the data cache, so compare that column between the later methods only.",
        "",
        "Fidelity against training steps:",
        "",
    ]
    steps = [h["step"] for h in results[0]["history"]]
    lines.append("| step | " + " | ".join(LABELS[r["method"]] for r in results) + " |")
    lines.append("|---" * (len(results) + 1) + "|")
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(f"{r['history'][i]['fidelity']:.3f}" for r in results) + " |")
    lines += ["", "![fidelity vs steps](convergence.png)", ""]
    lines += _observations(args, results, base_fid)
    (docs / "convergence.md").write_text("\n".join(lines) + "\n")


def _observations(args, results: list[dict], base_fid: float) -> list[str]:
    """Plain statements computed from the numbers (no interpretation beyond them)."""
    out = ["## Observations (computed)", ""]
    by = {r["method"]: r for r in results}
    for r in results:
        h = r["history"]
        out.append(
            f"- {LABELS[r['method']]}: fidelity {h[0]['fidelity']:.3f} at step 0 (base alone {base_fid:.3f}), "
            f"{h[-1]['fidelity']:.3f} after {h[-1]['step']} steps; reaches {args.threshold:g} "
            + (f"at step {steps_to(h, args.threshold)}" if steps_to(h, args.threshold) is not None else "not at all")
            + f"; {r['trainable_parameters']:,} trainable parameters, {r['seconds_per_step']:.3f} s/step."
        )
    if "cross_norm" in by and "controlnet" in by:
        ratio = by["controlnet"]["trainable_parameters"] / by["cross_norm"]["trainable_parameters"]
        out.append(f"- ControlNet trains {ratio:.1f}x the parameters of the ControlNeXt module.")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="base model folder (default: the shipped demo base)")
    p.add_argument("--condition", choices=("edges", "mask"), default="edges")
    p.add_argument("--methods", default="cross_norm,zero_conv,controlnet")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=16)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=4321)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.5, help="fidelity threshold for 'steps to reach'")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "convergence.json")
    args = p.parse_args(argv)
    if args.base is None:
        from controlnext.demo import demo_assets

        assets = demo_assets()
        if assets is None:
            p.error("the shipped demo base is not installed; pass --base")
        args.base = str(assets / "base")
    if args.method:
        rec = run_method(args)
        print("RESULT " + json.dumps(rec), flush=True)
        return 0

    t0 = time.time()
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, *passthrough, "--method", m, "--base", args.base]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
        if proc.returncode != 0:
            print(f"method {m} failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        results.append(json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    torch.set_num_threads(args.threads)
    base_fid = baseline(args)
    args.command = "python benchmarks/convergence.py " + " ".join(passthrough)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "out_json"},
                "machine": machine(),
                "date": dt.date.today().isoformat(),
                "base_fidelity": base_fid,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    write_report(args, results, base_fid, time.time() - t0)
    print(f"wrote docs/convergence.md, docs/convergence.png, {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
