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

Every ``--eval-every`` steps the control fidelity (:mod:`controlnext.shapes.metrics`: edge F1 with a 2 px tolerance, or
mask IoU) is measured on ``--eval-n`` held-out (prompt, condition) cases, sampled with the same scheduler, steps,
guidance and seeds for every method. Each method runs in its own subprocess so that peak memory (the process's
peak RSS during training on CPU, reset when training starts; ``torch.cuda.max_memory_allocated`` on GPU) is its
own. Writes ``docs/convergence.md`` (table, machine, date, steps to reach ``--threshold``),
``docs/convergence.png`` and the raw ``benchmarks/results/convergence.json``.

Fairness: with several ``--lrs`` each method first gets a learning-rate sweep on its own seed (``--sweep-seed``), and
its best LR (highest mean fidelity over the evaluations after step 0, i.e. the area under its curve) is then trained
on every ``--seeds`` seed; the report gives the mean and spread over those seeds. ``cross_norm_unet`` adds the
published SD1.5 recipe's trainable UNet subset (attention output projections) to the cross-norm module;
``timestep_free_unet`` is that recipe with an encoder without timestep input (computed once per generation), and
``t2i_adapter`` is diffusers' ``T2IAdapter``. ``--add`` runs only ``--methods`` and reports them beside the runs
already in ``--out-json`` (same setup required), so a new method does not re-run the whole study.

Usage: ``python benchmarks/convergence.py --lrs 3e-4,1e-3,3e-3 --seeds 0,1,2 --jobs 2`` (each run is about 4 minutes
on one CPU thread; ``--jobs`` runs that many at once).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import importlib.util
import json
import platform
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
    "cross_norm_unet": "ControlNeXt (cross-norm) + UNet to_out",
    "controlnet": "ControlNet (diffusers)",
    "timestep_free_unet": "ControlNeXt timestep-free + UNet to_out",
    "t2i_adapter": "T2I-Adapter (diffusers)",
}
#: What must match for runs of an earlier study to be reported beside new ones (``--add``).
SAME_SETUP = ("condition", "steps", "eval_every", "eval_n", "eval_steps", "eval_seed", "guidance", "batch", "lrs",
              "seeds", "sweep_seed", "n", "data_seed", "threads")


def _loop_module():
    spec = importlib.util.spec_from_file_location(
        "train_demo_controlnext", ROOT / "scripts" / "train_demo_controlnext.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _proc_status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB; None where /proc is missing (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Start the peak (VmHWM) afresh from the current RSS (Linux >= 4.0); False where that is not possible.

    ``ru_maxrss`` cannot be used: Linux keeps it across fork + exec, so every run would report at least the parent's
    peak (the parent holds the base and the encoded data), which made all methods look alike.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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


def data_cache(args) -> Path:
    """Encoded training data, shared by the runs' subprocesses (keyed by the encoders' files, condition, size, seed).

    Keyed by content, not path: a retrained base in the same folder must not reuse stale latents or embeddings.
    """
    digest = hashlib.sha1()
    files = [f for part in ("vae", "text_encoder", "tokenizer") for f in sorted((Path(args.base) / part).rglob("*"))]
    for f in files:
        if f.is_file():
            digest.update(f.relative_to(args.base).as_posix().encode() + b"\0" + f.read_bytes())
    tag = f"{digest.hexdigest()}-{args.condition}-{args.n}-{args.data_seed}"
    return ROOT / "build" / "convergence-cache" / f"{hashlib.sha1(tag.encode()).hexdigest()[:16]}.pt"


def run_method(args) -> dict:
    """Train one method (in this process) and return its record."""
    from controlnext.shapes.metrics import mean_fidelity
    from controlnext.shapes.world import condition_image, render_sample

    torch.set_num_threads(args.threads)
    loop = _loop_module()
    base = loop.load_base(args.base)
    # Encoded once per (base, condition, n, seed) and shared by the methods' subprocesses.
    data = loop.prepare_data(base, args.condition, args.n, args.data_seed, cache=data_cache(args))
    cases = [render_sample(args.eval_seed, i) for i in range(args.eval_n)]
    prompts = [s.caption for s in cases]
    cond_np = [condition_image(s, args.condition) for s in cases]
    conds = torch.from_numpy(np.stack(cond_np)).permute(0, 3, 1, 2).float() / 255.0
    seeds = list(range(args.eval_n))
    gc.collect()
    # Without a reset the peak would include loading the base and data: report none rather than a wrong one.
    rss_before = _proc_status_mb("VmRSS") if _reset_peak_rss() else None
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
        "lr": args.lr,
        "seed": args.seed,
        "prediction_type": base.prediction_type,
        "trainable_parameters": n_params,
        "seconds_per_step": round(stats["seconds_per_step"], 4),
        "peak_rss_mb": None if rss_before is None else round(_proc_status_mb("VmHWM"), 1),
        "rss_before_training_mb": None if rss_before is None else round(rss_before, 1),
        "peak_gpu_mb": peak_gpu,
        "history": history,
        "final_loss_avg": stats["final_loss_avg"],
        "losses": [round(x, 5) for x in stats["losses"]],
    }


def _peak_cell(runs: list[dict]) -> str:
    """'peak (+growth)' in MB for a table cell; '-' where /proc was not available."""
    if any(r.get("peak_rss_mb") is None for r in runs):
        return "-"
    growth = np.mean([r["peak_rss_mb"] - r["rss_before_training_mb"] for r in runs])
    return f"{max(r['peak_rss_mb'] for r in runs):.0f} (+{growth:.0f})"


def baseline(args, loop, base) -> float:
    """Fidelity of the base model alone (no control) on the same cases and seeds."""
    from controlnext.shapes.metrics import mean_fidelity
    from controlnext.shapes.world import condition_image, render_sample

    cases = [render_sample(args.eval_seed, i) for i in range(args.eval_n)]
    imgs = sample(
        loop, None, base, [s.caption for s in cases], None, range(args.eval_n), args.eval_steps, args.guidance
    )
    return float(np.mean(mean_fidelity(imgs, [condition_image(s, args.condition) for s in cases], args.condition)))


def steps_to(history: list[dict], threshold: float) -> int | None:
    return next((h["step"] for h in history if h["fidelity"] >= threshold), None)


def curve_score(history: list[dict]) -> float:
    """Mean fidelity over the evaluations after step 0 (the area under the curve): what the LR sweep maximises."""
    return float(np.mean([h["fidelity"] for h in history if h["step"] > 0]))


def fidelity_curves(runs: list[dict]) -> np.ndarray:
    """(runs, evaluations) array of fidelity; the runs share their evaluation steps."""
    return np.array([[h["fidelity"] for h in r["history"]] for r in runs])


def machine() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{machine_description(device)}; torch {torch.__version__}; Python {platform.python_version()}"


def write_report(
    args,
    sweep: list[dict],
    finals: dict[str, list[dict]],
    best_lr: dict,
    base_fid: float,
    wall: float,
    added: dict[str, str] | None = None,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = ROOT / "docs"
    methods = list(finals)
    first = finals[methods[0]][0]
    target = first.get("prediction_type", "epsilon").replace("_prediction", "")
    metric = "edge F1 (2 px tolerance)" if args.condition == "edges" else "mask IoU"
    n_seeds = len(args.seed_list)

    steps = [h["step"] for h in first["history"]]
    curves = {m: fidelity_curves(finals[m]) for m in methods}
    auc = {m: [curve_score(r["history"]) for r in finals[m]] for m in methods}

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for m in methods:
        c = curves[m]
        line = ax.plot(steps, c.mean(0), marker="o", ms=3, label=f"{LABELS[m]}, lr {best_lr[m]:g}")[0]
        if n_seeds > 1:
            ax.fill_between(steps, c.min(0), c.max(0), color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(base_fid, color="grey", ls=":", label="base model, no control")
    ax.axhline(args.threshold, color="black", ls="--", lw=0.8, label=f"threshold {args.threshold:g}")
    ax.set_xlabel(f"training step (batch {args.batch})")
    ax.set_ylabel(f"control fidelity: {metric}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    spread = f"mean and min-max over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set_title(f"Convergence on shapes/{args.condition} (best LR per method; {spread})", fontsize=9)
    fig.tight_layout()
    fig.savefig(docs / "convergence.png")

    lines = [
        "# Convergence study: ControlNeXt (Cross Normalization, zero-conv, timestep-free) vs ControlNet vs T2I-Adapter",
        "",
        f"Measured {dt.date.today().isoformat()} on {machine()}, {args.threads} thread(s) per run, {args.jobs} run(s) "
        f"at a time; this run {wall / 60:.1f} min.",
        f"Reproduce: `{args.command}` (raw numbers in `benchmarks/results/convergence.json`).",
        "",
    ]
    if added:
        lines += [
            "The methods were measured in separate runs of the study with the same setup; s/step and peak RSS compare "
            "only between rows of the same run:",
            "",
            *(f"- {LABELS[m]}: {how}" for m, how in added.items()),
            "",
        ]
    lines += [
        "Setup (identical for every method): frozen shipped shapes base (64x64, 16x16x4 latents); "
        f"{args.n} training samples (shapes seed {args.data_seed}, `{args.condition}` condition); batch {args.batch}; "
        f"{args.steps} steps; AdamW (50-step warm-up, then constant LR; weight decay 0.01, grad clip 1); caption "
        f"dropout 0.1; {target} MSE at uniform timesteps; one seeded generator per run drives data order, noise and "
        "timesteps, so runs with the same seed see the same batches. Only the control method's parameters train, "
        "plus, for the `+ UNet to_out` rows, the UNet's attention output projections (the published SD1.5 recipe). "
        f"Fidelity: {metric} on {args.eval_n} held-out cases (shapes seed {args.eval_seed}), DPM-Solver++ "
        f"{args.eval_steps} steps, guidance {args.guidance:g}, fixed sampling seeds. "
        f"Base model alone (no control): **{base_fid:.3f}**.",
        "",
    ]
    if sweep:
        lrs = sorted({r["lr"] for r in sweep})
        lines += [
            f"## Learning-rate sweep (seed {args.sweep_seed}, not one of the reported seeds)",
            "",
            "Mean fidelity over the evaluations after step 0 (area under the curve; the selection criterion), and "
            f"the fidelity at step {args.steps} in brackets. The best LR per method is in bold.",
            "",
            "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---" * (len(lrs) + 1) + "|",
        ]
        for m in methods:
            cells = []
            for lr in lrs:
                r = next(x for x in sweep if x["method"] == m and x["lr"] == lr)
                cell = f"{curve_score(r['history']):.3f} ({r['history'][-1]['fidelity']:.3f})"
                cells.append(f"**{cell}**" if lr == best_lr[m] else cell)
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")

    seeds = ", ".join(str(s) for s in args.seed_list)
    lines += [
        f"## Results at each method's best LR (seeds {seeds})",
        "",
        f"Steps to reach fidelity {args.threshold:g}: on the seed-mean curve, and per seed in brackets "
        f"('-' = not within {args.steps}). Fidelity values are mean ± standard deviation over the seeds.",
        "",
        f"| method | lr | trainable params | s/step | peak RSS (MB) | steps to {args.threshold:g} | "
        f"fidelity @ {args.steps} | mean fidelity (AUC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        runs, c = finals[m], curves[m]
        mean_history = [{"step": st, "fidelity": f} for st, f in zip(steps, c.mean(0))]
        reach_mean = steps_to(mean_history, args.threshold)
        per_seed = [steps_to(r["history"], args.threshold) for r in runs]
        lines.append(
            f"| {LABELS[m]} | {best_lr[m]:g} | {runs[0]['trainable_parameters']:,} | "
            f"{np.mean([r['seconds_per_step'] for r in runs]):.3f} | "
            f"{_peak_cell(runs)} | "
            f"{reach_mean if reach_mean is not None else '-'} "
            f"({', '.join('-' if x is None else str(x) for x in per_seed)}) | "
            f"{c[:, -1].mean():.3f} ± {c[:, -1].std():.3f} | {np.mean(auc[m]):.3f} ± {np.std(auc[m]):.3f} |"
        )
    lines += [
        "",
        "s/step: training steps only (evaluation excluded), mean over the seeds; with several runs at a time they "
        "share the machine, so compare s/step between rows of this table only. Peak RSS: the run's own process "
        "during training and its evaluations (base and data included; largest over the seeds), and in brackets its "
        "growth over the RSS at the start of training (the method's parameters, gradients, optimizer state and "
        "activations; mean over the seeds).",
        "",
        "Seed-mean fidelity against training steps:",
        "",
        "| step | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for i, st in enumerate(steps):
        cells = [f"{curves[m][:, i].mean():.3f} ± {curves[m][:, i].std():.3f}" for m in methods]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", "![fidelity vs steps](convergence.png)", "", "## Observations (computed)", ""]
    by_auc = sorted(methods, key=lambda m: -np.mean(auc[m]))
    lines.append("- Ranking by mean fidelity over the run: " + " > ".join(LABELS[m] for m in by_auc) + ".")
    if "cross_norm_unet" in finals and "timestep_free_unet" in finals:
        a, b = (finals[m][0]["trainable_parameters"] for m in ("cross_norm_unet", "timestep_free_unet"))
        lines.append(f"- The timestep-free variant trains {a - b:,} fewer parameters (no timestep embedding).")
    if "cross_norm" in finals and "controlnet" in finals:
        ratio = finals["controlnet"][0]["trainable_parameters"] / finals["cross_norm"][0]["trainable_parameters"]
        lines.append(f"- ControlNet trains {ratio:.1f}x the parameters of the ControlNeXt module.")
    (docs / "convergence.md").write_text("\n".join(lines) + "\n" + DISCUSSION_MARKER + "\n" + _discussion(docs))


DISCUSSION_MARKER = "<!-- discussion: written by hand, kept when the report is regenerated -->"


def _discussion(docs: Path) -> str:
    """The hand-written discussion below the marker of the current report, kept across regenerations."""
    old = docs / "convergence.md"
    text = old.read_text() if old.is_file() else ""
    return text.split(DISCUSSION_MARKER, 1)[1].lstrip("\n") if DISCUSSION_MARKER in text else ""


def _merge_earlier(args, methods: list[str], sweep: list[dict], runs: list[dict], best_lr: dict):
    """Add the runs of the other methods recorded in ``args.out_json`` (the same setup is required).

    Returns the merged sweep, runs and best LRs, and for each added method the command and date it was measured by.
    """
    if not args.out_json.is_file():
        raise SystemExit(f"--add: no earlier study at {args.out_json}; run the study without --add first.")
    old = json.loads(args.out_json.read_text())
    differs = [k for k in SAME_SETUP if old["args"].get(k) != getattr(args, k)]
    if differs:
        raise SystemExit(f"--add: the earlier study in {args.out_json} differs in {differs}; use its settings.")
    keep = [m for m in old["best_lr"] if m not in methods]
    added = {m: v for m, v in old.get("added", {}).items() if m in keep}
    added.update({m: f"`{args.command}` on {dt.date.today().isoformat()}, {machine()}" for m in methods})
    for m in keep:
        added.setdefault(m, f"`{old['args']['command']}` on {old['date']}, {old['machine']}")
    sweep = [r for r in old["sweep"] if r["method"] in keep] + sweep
    runs = [r for r in old["results"] if r["method"] in keep] + runs
    return sweep, runs, {**{m: old["best_lr"][m] for m in keep}, **best_lr}, added


def _run_all(args, jobs: list[tuple[str, float, int]], passthrough: list[str]) -> list[dict]:
    """Run (method, lr, seed) jobs in subprocesses, ``args.jobs`` at a time, in the given order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[str, float, int]) -> dict:
        m, lr, seed = job
        cmd = [sys.executable, __file__, *passthrough, "--method", m, "--lr", repr(lr), "--seed", str(seed)]
        proc = subprocess.run(cmd + ["--base", args.base], stdout=subprocess.PIPE, text=True, check=False)
        out = proc.stdout.splitlines()
        sys.stdout.write("".join(line + "\n" for line in out if not line.startswith("RESULT ")))
        if proc.returncode != 0:
            raise RuntimeError(f"run {job} failed with exit code {proc.returncode}")
        return json.loads(next(x for x in out if x.startswith("RESULT "))[7:])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, jobs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="base model folder (default: the shipped demo base)")
    p.add_argument("--condition", choices=("edges", "mask"), default="edges")
    p.add_argument("--methods", default="cross_norm,zero_conv,cross_norm_unet,controlnet")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=16)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=4321)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lrs", default="1e-3", help="learning rates; with several, each method keeps its best")
    p.add_argument("--seeds", default="0", help="training seeds reported at each method's best LR")
    p.add_argument("--sweep-seed", type=int, default=100, help="training seed of the LR sweep's runs")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    p.add_argument("--threshold", type=float, default=0.5, help="fidelity threshold for 'steps to reach'")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # internal: one run, printed as JSON
    p.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "convergence.json")
    p.add_argument("--add", action="store_true", help="keep the other methods' runs from --out-json (same setup)")
    args = p.parse_args(argv)
    if args.base is None:
        from controlnext.shapes.demo import demo_assets

        assets = demo_assets()
        if assets is None:
            p.error("the shipped demo base is not installed; pass --base")
        args.base = str(assets / "base")
    if args.method:
        rec = run_method(args)
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(LABELS)}")
    lrs = [float(x) for x in args.lrs.split(",")]
    args.seed_list = [int(x) for x in args.seeds.split(",")]

    t0 = time.time()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    # Encode the shared data once here, so parallel runs do not race to write the cache.
    loop = _loop_module()
    base = loop.load_base(args.base)
    loop.prepare_data(base, args.condition, args.n, args.data_seed, cache=data_cache(args))
    sweep: list[dict] = []
    best_lr = {m: lrs[0] for m in methods}
    if len(lrs) > 1:
        sweep = _run_all(args, [(m, lr, args.sweep_seed) for m in methods for lr in lrs], passthrough)
        for m in methods:
            best_lr[m] = max((r for r in sweep if r["method"] == m), key=lambda r: curve_score(r["history"]))["lr"]
        print("best learning rates: " + json.dumps(best_lr), flush=True)
    runs = _run_all(args, [(m, best_lr[m], s) for m in methods for s in args.seed_list], passthrough)
    args.command = "python benchmarks/convergence.py " + " ".join(passthrough)
    added: dict[str, str] = {}
    if args.add:
        sweep, runs, best_lr, added = _merge_earlier(args, methods, sweep, runs, best_lr)
        methods = [m for m in LABELS if m in best_lr]
    finals = {m: [r for r in runs if r["method"] == m] for m in methods}
    base_fid = baseline(args, loop, base)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out_json", "method", "lr", "seed")},
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "base_fidelity": base_fid,
        "best_lr": best_lr,
        "added": added,
        "sweep": sweep,
        "results": runs,
    }
    args.out_json.write_text(json.dumps(record, indent=1) + "\n")
    write_report(args, sweep, finals, best_lr, base_fid, time.time() - t0, added)
    print(f"wrote docs/convergence.md, docs/convergence.png, {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
