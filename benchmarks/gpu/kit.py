#!/usr/bin/env python
"""GPU validation kit: measures the project's real-size performance and memory claims on one CUDA GPU in one go.

    bash benchmarks/gpu/run.sh --out $OUT/gpu            # on the GPU machine (under 8 minutes on an H100/H200)
    bash benchmarks/gpu/run.sh --smoke --out /tmp/kit    # every part at tiny sizes on the CPU (CI, about a minute)

Parts, each run in its own process (a fresh CUDA context, so one part's memory or crash does not touch the next) with
its own time budget; a part that runs out of it keeps what it measured and records the rest as "out of budget":

1. ``inference``: SD1.5 512 px fp16 and SDXL 1024 px fp16/bf16, base / ControlNeXt / ControlNet with guidance
   (benchmarks/gpu/inference.py); ``compile``: the same under ``torch.compile`` (inductor), run last since it is the
   part most likely to run out of time;
2. ``video``: SVD-v2 at 576x1024, peak memory of a 14- and a 24-frame window, with and without model CPU offload,
   and the largest window that fits 24 GiB (benchmarks/gpu/video.py);
3. ``training``: ControlNeXt's training step against ControlNet's at SDXL size (benchmarks/gpu/training.py);
4. ``dit``: SD3-medium and Flux.1-dev at 1024 px bf16, base / ControlNeXt / diffusers' SD3 and Flux ControlNets
   (benchmarks/gpu/dit.py); it runs before ``compile``.

Everything is written under ``--out`` (default benchmarks/results/gpu-DATE/): ``results.json`` (environment, every
record, goals, exit code), ``results.md`` (the tables, also printed last), ``parts/*.jsonl`` (records as they were
measured), ``raw/`` (the full ``controlnext bench`` results, every step time) and ``logs/`` (each part's output).
Exit code: 1 when any measurement failed validation or a part crashed, 0 otherwise ("out of budget", "oom",
"skipped" and "not yet" rows are reported, not failures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO / "src"))  # this checkout's code, also when kit.py is run without run.sh

from common import FAILED, OUT_OF_BUDGET, RecordFile, markdown_table, read_records, run_items  # noqa: E402

# Seconds per part on the GPU, in the order they run; their sum plus start-up stays under 8 minutes.
BUDGETS = {"inference": 95, "video": 70, "training": 95, "dit": 90, "compile": 115}
DEADLINE = 465  # seconds for the whole run (run.sh's checks add about 10 s before it starts)
SMOKE_BUDGETS = {"inference": 120, "video": 120, "training": 120, "dit": 120, "compile": 120}
SMOKE_DEADLINE = 540
TITLES = {
    "inference": "1. Inference: per-step time and peak memory (eager)",
    "compile": "1b. Inference under torch.compile",
    "video": "2. SVD-v2 memory at 576x1024",
    "training": "3. Training step at SDXL size",
    "dit": "4. DiT presets (SD3 / FLUX)",
}


# ------------------------------------------------------------------------------------------------ worker
def _worker_items(part: str, smoke: bool, out: Path, compile_backend: str | None):
    if part in ("inference", "compile"):
        import inference

        settings = inference.Settings.make(smoke, compile_backend)
        maker = inference.eager_items if part == "inference" else inference.compile_items
        return maker(settings, out / "raw")
    if part == "video":
        import video

        return video.items(smoke)
    if part == "training":
        import training

        return training.items(smoke)
    if part == "dit":
        import dit

        return dit.items(smoke, out / "raw")
    raise ValueError(f"unknown part {part!r}")


def _device_environment(smoke: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from controlnext import __version__
    from controlnext.bench import machine_description

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available() and not smoke
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": installed("diffusers"),
        "transformers": installed("transformers"),
        "accelerate": installed("accelerate"),
        "controlnext": __version__,
        "machine": machine_description(torch.device("cuda" if cuda else "cpu")),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    return env


def worker(args: argparse.Namespace) -> int:
    out = Path(args.out)
    records = RecordFile(out / "parts" / f"{args.worker}.jsonl")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "the GPU run needs a CUDA GPU that torch can see (torch.cuda.is_available() is False with torch "
            f"{torch.__version__}); use --smoke for the CPU check"
        )
    records.write({"kind": "env", **_device_environment(args.smoke)})
    items = _worker_items(args.worker, args.smoke, out, args.compile_backend)
    budget = args.deadline - time.time()
    run_items(args.worker, items, records, budget, cuda=not args.smoke, fault=args.fault == args.worker)
    return 0


# ------------------------------------------------------------------------------------------------ parent
def _host_environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
    }
    try:
        query = "name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, memory = [x.strip() for x in smi.stdout.strip().splitlines()[0].split(",")]
            env.update(nvidia_smi_gpu=name, driver=driver, nvidia_smi_memory=memory)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            env["commit"] = commit.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_part(part: str, args: argparse.Namespace, out: Path, seconds: float) -> tuple[list[dict], dict, dict]:
    """Run one part in a worker process; returns (records, its environment, a summary of the part's run)."""
    log_path = out / "logs" / f"{part}.log"
    jsonl = out / "parts" / f"{part}.jsonl"
    jsonl.unlink(missing_ok=True)
    # The worker stops starting items a few seconds before the hard limit; the kill is the backstop.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--out", str(out)]
    cmd += ["--deadline", f"{time.time() + seconds - 5:.1f}"]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--compile-backend", args.compile_backend] if args.compile_backend else []
    cmd += ["--fault", args.fault] if args.fault else []
    start = time.monotonic()
    killed = False
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env)
        try:
            rc = proc.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its compile workers
            rc = proc.wait()
    took = time.monotonic() - start
    plan, lines = read_records(jsonl)
    env = next((r for r in lines if r.get("kind") == "env"), {})
    records = [r for r in lines if r.get("kind") != "env"]
    seen = {r["item"] for r in records}
    summary = dict(part=part, budget_s=round(seconds, 1), seconds=round(took, 1), returncode=rc, killed=killed)
    if plan is None and killed:  # still starting (imports, CUDA) when its budget ran out
        error = f"the part's {seconds:.0f} s budget ran out before it planned its measurements"
        records.append(dict(part=part, item="(part)", status=OUT_OF_BUDGET, error=error))
    elif plan is None:  # it died before planning (import error, no GPU, ...)
        error = f"the part did not start (rc {rc}): {_log_tail(log_path)}"
        records.append(dict(part=part, item="(part)", status=FAILED, error=error))
    else:
        for i, name in enumerate(n for n in plan if n not in seen):
            if killed:
                what = "killed while running" if i == 0 else "not started"
                error = f"{what}: the part's {seconds:.0f} s budget ran out"
                records.append(dict(part=part, item=name, status=OUT_OF_BUDGET, error=error))
            else:
                error = f"not measured: the worker exited with rc {rc}: {_log_tail(log_path)}"
                records.append(dict(part=part, item=name, status=FAILED, error=error))
    if rc != 0 and not killed and plan is not None and all(r["item"] in seen for r in records):
        records.append(dict(part=part, item="(part)", status=FAILED, error=f"the worker exited with rc {rc}"))
    return records, env, summary


def exit_code(records: list[dict]) -> int:
    """1 when any record failed (a wrong measurement, a crash), else 0."""
    return 1 if any(r.get("status") == FAILED for r in records) else 0


def render(result: dict[str, Any]) -> str:
    import dit
    import inference
    import training
    import video

    env, smoke = result["environment"], result["smoke"]
    gpu = env.get("gpu") or env.get("nvidia_smi_gpu") or "none"
    lines = [
        "## GPU validation kit: results" + (" (smoke: tiny models on the CPU)" if smoke else ""),
        "",
        f"- Date: {env.get('date')}; host {env.get('host')}; commit {env.get('commit', 'unknown')}",
        f"- GPU: {gpu}"
        + (f", {env['gpu_memory_bytes'] / 2**30:.0f} GiB" if "gpu_memory_bytes" in env else "")
        + f"; driver {env.get('driver', 'n/a')}; CUDA {env.get('cuda', 'n/a')}; cuDNN {env.get('cudnn', 'n/a')}",
        f"- Machine: {env.get('machine', 'unknown')}",
        f"- Versions: torch {env.get('torch')}, diffusers {env.get('diffusers')}, transformers "
        f"{env.get('transformers')}, accelerate {env.get('accelerate')}, controlnext {env.get('controlnext')}, "
        f"python {env.get('python')}",
        f"- Command: `{result['command']}`; {result['seconds']:.0f} s in all",
    ]
    if smoke:
        lines.append(
            "- Smoke run: tiny random models on the CPU (float16 run as float32, compile with dynamo's eager "
            "backend); it checks the kit, its numbers say nothing about GPU performance or the goals."
        )
    lines += ["", "### Goals", ""]
    mark = " (smoke)" if smoke else ""
    goal_rows = [[g["goal"], g["measured"], g["status"] + mark] for g in result["goals"]]
    lines.append(markdown_table(["goal", "measured", "status"], goal_rows))
    tables = {"inference": inference.table, "compile": inference.table, "video": video.table}
    tables.update(training=training.table, dit=dit.table)
    for part in result["parts"]:
        name = part["part"]
        rows = [r for r in result["records"] if r["part"] == name]
        lines += [
            "",
            f"### {TITLES[name]}",
            "",
            f"Budget {part['budget_s']:.0f} s, used {part['seconds']:.0f} s"
            + (" (stopped at the budget)" if part.get("killed") else ""),
            "",
            tables[name](rows),
        ]
    bad = [r for r in result["records"] if r.get("status") == FAILED]
    lines += [
        "",
        f"**{len(bad)} failed measurement(s); exit code {result['exit_code']}.**" if bad else "All measurements valid.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/gpu-DATE)")
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes on the CPU (checks the kit)")
    p.add_argument("--parts", default=",".join(BUDGETS), help=f"comma-separated subset of {', '.join(BUDGETS)}")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="override a part's budget")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; smoke: eager)")
    p.add_argument("--fault", default=None, metavar="PART", help="testing: corrupt PART's first measured time")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in BUDGETS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; parts are {', '.join(BUDGETS)}")
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for spec in args.budget:
        name, _, value = spec.partition("=")
        if name not in budgets or not value.replace(".", "", 1).isdigit():
            p.error(f"--budget wants PART=SECONDS with PART in {', '.join(budgets)}, got {spec!r}")
        budgets[name] = float(value)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = Path(args.out).resolve() if args.out else REPO / "benchmarks" / "results" / f"gpu-{stamp}"
    for sub in ("parts", "logs", "raw"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    deadline = SMOKE_DEADLINE if args.smoke else DEADLINE
    env = _host_environment()
    records: list[dict] = []
    summaries = []
    for part in [x for x in BUDGETS if x in parts]:  # always in the planned order
        left = deadline - (time.monotonic() - start)
        seconds = min(budgets[part], left)
        if left < 10:  # too little for a worker to start
            records.append(dict(part=part, item="(part)", status=OUT_OF_BUDGET, error="the run's deadline was reached"))
            summaries.append(dict(part=part, budget_s=budgets[part], seconds=0.0, returncode=None, killed=False))
            continue
        print(f"[kit] {part}: up to {seconds:.0f} s ...", file=sys.stderr, flush=True)
        part_records, part_env, summary = run_part(part, args, out, seconds)
        records += part_records
        summaries.append(summary)
        for key, value in part_env.items():
            if key != "kind":
                env.setdefault(key, value)

    import dit
    import inference
    import video

    goals = inference.goals(records, args.smoke) + video.goals(records, args.smoke) + dit.goals(records, args.smoke)
    command = "bash benchmarks/gpu/run.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(
        environment=env,
        smoke=args.smoke,
        command=command.strip(),
        budgets={s["part"]: s["budget_s"] for s in summaries},
        parts=summaries,
        goals=goals,
        records=records,
        seconds=time.monotonic() - start,
        exit_code=exit_code(records),
    )
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = render(result)
    (out / "results.md").write_text(text)
    print(f"[kit] wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr, flush=True)
    print(text, end="", flush=True)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
