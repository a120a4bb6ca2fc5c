"""The GPU validation kit (benchmarks/gpu): its smoke run end to end, and the validation that fails wrong numbers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))

import common  # noqa: E402
import kit  # noqa: E402
import video  # noqa: E402


def _git_status() -> str:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every part through run.sh, with one measurement corrupted on purpose (--fault training).

    One run serves both checks (the 2-core CI budget): every other record must be valid, and the corrupted one must
    fail validation and make the exit code non-zero while the rest of its part still runs.
    """
    out = tmp_path_factory.mktemp("kit") / "gpu"
    before = _git_status()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--smoke", "--out", str(out), "--fault", "training"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, out, before


def test_smoke_writes_json_and_table_for_every_part(smoke):
    proc, out, _ = smoke
    assert (out / "results.json").is_file(), proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    env = result["environment"]
    for key in ("date", "machine", "torch", "diffusers", "python"):
        assert env.get(key), key
    assert env["torch"] == torch.__version__
    assert [p["part"] for p in result["parts"]] == ["inference", "video", "training", "dit", "compile"]
    by_part: dict[str, list[dict]] = {}
    for r in result["records"]:
        by_part.setdefault(r["part"], []).append(r)

    eager = by_part["inference"]
    assert {(r["preset"], r["requested_dtype"]) for r in eager} == {
        ("ci-sdxl", "float16"),
        ("ci", "float16"),
        ("ci-sdxl", "bfloat16"),
    }
    for r in eager:
        assert r["status"] == "ok", r
        assert r["cfg"] and r["batch"] == 2
        assert r["step_s"] > 0 and r["peak_bytes"] > 0 and len(r["step_samples_s"]) == 4
    assert {r["row"] for r in eager} == {"base", "controlnext", "controlnet"}
    controlnext = next(r for r in eager if r["row"] == "controlnext" and r["preset"] == "ci-sdxl")
    assert math.isfinite(controlnext["overhead"]) and controlnext["peak_overhead"] > 0  # it adds a module

    compiled = by_part["compile"]
    assert [r["row"] for r in compiled] == ["base", "controlnext"]
    for r in compiled:
        assert r["status"] == "ok" and r["mode"] == "compile (eager)", r
        assert r["compile_s"] > 0 and r["compiled_graphs"] >= 1
    # Overheads of compiled rows are against the compiled base measured in the same part.
    base = compiled[0]["step_s"]
    assert compiled[1]["overhead"] == pytest.approx(compiled[1]["step_s"] / base - 1)

    windows = [r for r in by_part["video"] if r["item"].startswith("window")]
    assert [(r["frames"], r["offload"]) for r in windows] == [(4, False), (6, False), (4, True), (6, True)]
    for r in windows:
        assert r["status"] == "ok" and 0 < r["step_peak_bytes"] <= r["need_bytes"] and r["call_s"] > 0
    fits = [r for r in by_part["video"] if "largest_window" in r]
    assert len(fits) == 2 and all(r["status"] == "ok" and r["per_frame_bytes"] > 0 for r in fits)
    # The fit goes through both measurements: need(F) = fixed + per_frame * F.
    no_offload = fits[0]
    for r in windows[:2]:
        predicted = no_offload["fixed_bytes"] + no_offload["per_frame_bytes"] * r["frames"]
        assert predicted == pytest.approx(r["need_bytes"], abs=r["frames"] + 1)
    verify = [r for r in by_part["video"] if r["item"].startswith("verify")]
    assert [r["status"] for r in verify] == ["skipped", "skipped"]  # needs CUDA; recorded, not silent

    train = by_part["training"]
    assert [r["item"] for r in train] == [
        "controlnext checkpointing off",
        "controlnext checkpointing on",
        "controlnet checkpointing off",
        "controlnet checkpointing on",
    ]
    for r in train[1:]:
        assert r["status"] == "ok", r
        assert r["steps_per_second"] == pytest.approx(1 / r["step_s"]) and r["peak_bytes"] > 0
    assert train[1]["trained_params"] < train[2]["trained_params"]  # ControlNeXt trains far less than ControlNet

    # The transformer presets: SD3 with its CFG batch, Flux.1-dev (guidance-distilled) without, in bfloat16.
    dit = by_part["dit"]
    assert {(r["preset"], r["row"], r["cfg"], r["batch"]) for r in dit} == {
        (p, row, cfg, 2 if cfg else 1)
        for p, cfg in (("ci-sd3", True), ("ci-flux", False))
        for row in ("base", "controlnext", "controlnet")
    }
    for r in dit:
        assert r["status"] == "ok" and r["dtype"] == "bfloat16", r
        assert r["step_s"] > 0 and r["peak_bytes"] > 0 and len(r["step_samples_s"]) == 4
    assert {g["goal"] for g in result["goals"]} >= {
        "ControlNeXt per-step overhead <= 2% of the base, ci-sd3 bfloat16",
        "ControlNeXt per-step overhead <= 2% of the base, ci-flux bfloat16",
    }
    assert {g["goal"].split(" (")[0] for g in result["goals"]} >= {
        "ControlNeXt per-step overhead <= 3% of the base, CFG, SDXL 1024 px fp16"
    }


def test_smoke_fault_fails_loudly_and_sets_the_exit_code(smoke):
    proc, out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    failed = [r for r in result["records"] if r["status"] == "failed"]
    assert len(failed) == 1, failed
    assert failed[0]["item"] == "controlnext checkpointing off"
    assert "step_s = 0.0" in failed[0]["error"] and "positive finite" in failed[0]["error"]
    assert proc.returncode == 1 and result["exit_code"] == 1
    assert "**failed**" in (out / "results.md").read_text()


def test_smoke_prints_the_table_last_and_writes_only_its_folder(smoke):
    proc, out, before = smoke
    md = (out / "results.md").read_text()
    assert proc.stdout.endswith(md)
    assert md.count("\n### ") == 6  # goals + five parts
    assert "| ci-sdxl 64 px | float32 (for float16) | eager | controlnext | 2 |" in md
    assert re.search(r"\| [+-]\d+\.\d% \([+-]\d+\.\d% to [+-]\d+\.\d%\) \|", md)  # with the range over rounds
    assert "1 failed measurement(s); exit code 1." in md
    assert sorted(p.name for p in out.iterdir()) == ["logs", "parts", "raw", "results.json", "results.md"]
    assert len(list((out / "raw").glob("*.json"))) == 7  # 3 eager + 2 DiT runs + 2 compiled rows, every step time
    assert _git_status() == before  # nothing written into the repository


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "record, expected",
    [
        ({"step_s": 0.0}, "step_s = 0.0"),
        ({"step_s": -0.5}, "step_s = -0.5"),
        ({"call_s": float("nan")}, "call_s = nan"),
        ({"step_s": float("inf")}, "step_s = inf"),
        ({"step_s": None}, "step_s = None"),
        ({"step_samples_s": [0.1, 0.0, 0.2]}, "1 sample(s)"),
        ({"step_samples_s": []}, "no samples"),
        ({"peak_bytes": -1}, "peak_bytes = -1"),
        ({"overhead": float("nan")}, "overhead = nan"),
    ],
)
def test_wrong_measurements_are_problems(record, expected):
    found = common.problems(record, cuda=False)
    assert len(found) == 1 and expected in found[0]
    with pytest.raises(common.MeasurementError, match=expected.split(" ")[0]):
        common.require(record, cuda=False)


def test_zero_peak_memory_is_wrong_on_cuda_only():
    assert common.problems({"peak_bytes": 0}, cuda=False) == []
    assert "zero peak memory on CUDA" in common.problems({"peak_bytes": 0}, cuda=True)[0]
    good = {"step_s": 0.01, "step_samples_s": [0.01, 0.02], "peak_bytes": 2**20, "overhead": -0.01, "batch": 2}
    assert common.problems(good, cuda=True) == []


def test_run_items_records_failures_oom_and_budget(tmp_path):
    def good():
        return [{"step_s": 0.01}]

    def bad():
        return [{"step_s": 0.01, "step_samples_s": [0.01, -0.01]}]

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def crash():
        raise RuntimeError("broken")

    def slow():
        import time

        time.sleep(0.3)
        return [{"step_s": 0.3}]

    items = [common.Item("good", good), common.Item("bad", bad), common.Item("oom", oom), common.Item("crash", crash)]
    path = tmp_path / "part.jsonl"
    records = common.run_items("p", items, common.RecordFile(path), budget_s=60, cuda=True, log=lambda m: None)
    assert {r["item"]: r["status"] for r in records} == {"good": "ok", "bad": "failed", "oom": "oom", "crash": "failed"}
    assert "step_samples_s: 1 sample(s)" in records[1]["error"] and "broken" in records[3]["error"]
    plan, written = common.read_records(path)
    assert plan == [i.name for i in items] and written == records
    # An item estimated (from the one it is like) to need more than what is left is recorded, not started.
    timed = [common.Item("slow", slow), common.Item("like slow", good, like="slow")]
    late = common.run_items("p", timed, common.RecordFile(tmp_path / "b.jsonl"), budget_s=0.5, cuda=True)
    assert [r["status"] for r in late] == ["ok", "out of budget"] and "like slow" in late[1]["error"]
    assert kit.exit_code(records) == 1
    assert kit.exit_code([r for r in records if r["status"] != "failed"]) == 0


def test_fault_injection_corrupts_the_first_time(tmp_path):
    items = [common.Item("a", lambda: [{"x": 1, "step_s": 0.5}]), common.Item("b", lambda: [{"step_s": 0.5}])]
    records = common.run_items("p", items, common.RecordFile(tmp_path / "f.jsonl"), 10, False, fault=True, log=print)
    assert [r["status"] for r in records] == ["failed", "ok"]


def test_window_fit_is_exact_on_a_line_and_refuses_flat_memory():
    gib = 2**30
    rows = [
        {"status": "ok", "offload": False, "frames": 14, "need_bytes": 10 * gib},
        {"status": "ok", "offload": False, "frames": 24, "need_bytes": 15 * gib},
    ]
    fit = video.fit_window(rows, offload=False, smoke=False)  # 3 GiB + 0.5 GiB per frame; 24 GiB budget
    assert (fit["fixed_bytes"], fit["per_frame_bytes"], fit["largest_window"]) == (3 * gib, gib // 2, 42)
    flat = [dict(r, need_bytes=10 * gib) for r in rows]
    with pytest.raises(common.MeasurementError, match="did not grow"):
        video.fit_window(flat, offload=False, smoke=False)
    with pytest.raises(common.MeasurementError, match="missing"):
        video.fit_window(rows[:1], offload=False, smoke=False)


def test_a_recompile_during_the_timed_steps_fails_the_compiled_row():
    from controlnext.bench import BenchConfig, RowResult, _compiled_rounds

    class Row:  # a compiled "step" whose string argument changes every call: dynamo recompiles each time
        name = "base"

        def begin(self, inputs, guidance):
            pass

        def compile(self, backend):
            self.fn = torch.compile(lambda x, tag: x * len(tag), backend=backend)

        def uncompile(self):
            pass

        def end(self):
            pass

        def step(self, k):
            return self.fn(torch.ones(2), f"step {k}")

    cfg = BenchConfig(preset="ci", repeats=1, steps=2, compile="eager").resolved()
    results = {("base", True): RowResult(name="base", cfg=True, batch=2)}
    with pytest.raises(Exception, match="[Rr]ecompil"):
        _compiled_rounds(cfg, [(Row(), True)], {True: None}, torch.device("cpu"), False, results)


def test_compiled_rows_call_compiled_wrappers_and_restore_the_models():
    from controlnext.bench import PRESETS, _ControlNetRow, build_controlnet, build_unet

    unet = build_unet(PRESETS["ci"], torch.device("cpu"), torch.float32)
    row = _ControlNetRow(unet, "sd15", build_controlnet(unet, torch.float32))
    row.compile("eager")  # wrapping only: nothing is traced until called
    assert row.call_unet is not unet and row.call_unet._orig_mod is unet
    assert row.call_controlnet._orig_mod is row.controlnet
    row.uncompile()
    assert row.call_unet is unet and row.call_controlnet is row.controlnet


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal shown without a GPU")
def test_gpu_run_without_cuda_is_refused_before_anything_runs(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--out", str(tmp_path / "gpu")], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0
    assert "sees no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "gpu").exists()


# ------------------------------------------------------------------------------------------------ orchestration
def _fake_worker(tmp_path: Path, body: str) -> str:
    """An executable standing in for the worker's Python: gets kit.py's worker arguments, runs ``body`` (bash)."""
    path = tmp_path / "fake-python"
    path.write_text(
        '#!/usr/bin/env bash\nwhile [[ $# -gt 0 ]]; do [[ "$1" == "--out" ]] && out="$2"; shift; done\n'
        f'jsonl="$out/parts/p.jsonl"\n{body}\n'
    )
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    "body, budget, statuses, killed",
    [
        # killed while still starting: the part is out of budget, not failed
        ("sleep 30", 1.5, {"(part)": "out of budget"}, True),
        # killed in its second item: that one "killed while running", the third "not started"
        (
            'echo \'{"kind": "plan", "items": ["a", "b", "c"]}\' > "$jsonl"\n'
            'echo \'{"part": "p", "item": "a", "status": "ok", "step_s": 0.1}\' >> "$jsonl"\nsleep 30',
            1.5,
            {"a": "ok", "b": "out of budget", "c": "out of budget"},
            True,
        ),
        # crashed before planning: failed, with the end of its log
        ("echo 'ImportError: no module named diffusers'; exit 3", 30, {"(part)": "failed"}, False),
        # crashed after its first item: the rest failed
        (
            'echo \'{"kind": "plan", "items": ["a", "b"]}\' > "$jsonl"\n'
            'echo \'{"part": "p", "item": "a", "status": "ok", "step_s": 0.1}\' >> "$jsonl"\nexit 1',
            30,
            {"a": "ok", "b": "failed"},
            False,
        ),
    ],
)
def test_a_part_killed_at_its_budget_or_crashed_is_recorded(tmp_path, monkeypatch, body, budget, statuses, killed):
    import argparse

    for sub in ("parts", "logs"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(kit.sys, "executable", _fake_worker(tmp_path, body))
    args = argparse.Namespace(smoke=True, compile_backend=None, fault=None)
    records, _, summary = kit.run_part("p", args, tmp_path, budget)
    assert {r["item"]: r["status"] for r in records} == statuses
    assert summary["killed"] is killed and summary["seconds"] < 20
    if killed:
        assert kit.exit_code(records) == 0 and "budget ran out" in records[-1]["error"]
        if "b" in statuses:
            assert "killed while running" in records[1]["error"] and "not started" in records[2]["error"]
    else:
        assert kit.exit_code(records) == 1
        if "(part)" in statuses:
            assert "ImportError: no module named diffusers" in records[0]["error"]
