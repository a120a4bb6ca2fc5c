"""The benchmark runs end to end on tiny models through the CLI, and its measuring tools count what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlnext.bench import BenchResult, RowResult, _flop_counter, _peak_new_bytes, render_markdown, update_docs
from controlnext.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _json_tail(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    return json.loads(last)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory) -> tuple[dict, str, Path]:
    """One `controlnext bench --preset ci --json` run shared by the checks below."""
    import contextlib
    import io

    docs = tmp_path_factory.mktemp("docs") / "benchmarks.md"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        args = ["--preset", "ci", "--json", "--quiet", "--repeats", "1", "--steps", "1", "--docs", str(docs)]
        rc = main(["bench", *args])
    assert rc == 0
    out = buf.getvalue()
    return _json_tail(out), out, docs


def _rows(data: dict) -> dict[tuple[str, bool], dict]:
    return {(r["name"], r["cfg"]): r for r in data["rows"]}


def test_ci_json_has_every_row_and_field(ci_run):
    data, out, _ = ci_run
    rows = _rows(data)
    names = ("base", "controlnext", "controlnext-sd15-release", "controlnet", "controlnext-plain")
    assert set(rows) == {(n, g) for n in names for g in (False, True)}
    for (name, cfg), r in rows.items():
        assert r["batch"] == (2 if cfg else 1)
        assert r["step_seconds"] > 0 and r["step_cpu_seconds"] >= 0
        assert isinstance(r["overhead"], float) and r["peak_mem_bytes"] > 0
        assert r["flops_per_step"] > 0 and r["added_params"] >= 0
        # The control path is timed directly inside the step (hooks / the ControlNet call); the base has none.
        assert (r["control_cpu_seconds"] is None) if name == "base" else (r["control_cpu_seconds"] > 0)
        assert name in out  # the printed table lists it
    for cfg in (False, True):
        assert rows[("base", cfg)]["overhead"] == 0.0 and rows[("base", cfg)]["added_params"] == 0
        assert 0 < rows[("controlnext", cfg)]["added_params"] < rows[("controlnet", cfg)]["added_params"]
        cn = rows[("controlnext", cfg)]
        assert cn["trainable_params"] > cn["added_params"]  # module + the UNet's attention output projections
    assert data["machine"] and data["date"] and data["versions"]["torch"] == torch.__version__
    assert data["command"].startswith("controlnext bench --preset ci")


def test_ci_flops_show_the_cached_prefix_and_dedup(ci_run):
    """FLOP counts are exact, so the optimisations show up as identities between rows."""
    rows = _rows(ci_run[0])

    def extra(name: str, cfg: bool) -> int:
        return rows[(name, cfg)]["flops_per_step"] - rows[("base", cfg)]["flops_per_step"]

    prefix = rows[("controlnext", False)]["prepare_flops"]
    assert prefix > 0 and rows[("controlnext-plain", False)]["prepare_flops"] == 0
    # The release's way runs the prefix every step; ours once per generation.
    assert extra("controlnext-plain", False) == extra("controlnext", False) + prefix
    # With guidance our encoder still runs on the one condition (mean/std are not FLOP-counted ops): no growth.
    assert extra("controlnext", True) == extra("controlnext", False)
    # The release's way encodes both halves (the shared timestep embedding is computed once in both cases).
    assert extra("controlnext-plain", True) > 1.9 * extra("controlnext-plain", False)
    assert rows[("controlnext", True)]["prepare_flops"] == prefix
    # ControlNet runs its copy of the encoder on both halves.
    assert extra("controlnet", True) == 2 * extra("controlnet", False)


def test_ci_writes_docs_section(ci_run):
    _, _, docs = ci_run
    text = docs.read_text()
    assert "<!-- bench:ci-64px-cpu-float32 -->" in text and "<!-- /bench:ci-64px-cpu-float32 -->" in text
    assert "| controlnext | yes | 2 |" in text
    assert "--docs" in text  # the regenerate command names the file


def test_from_json_rerenders_without_running(ci_run, tmp_path, capsys):
    _, out, _ = ci_run
    saved = tmp_path / "run.out"
    saved.write_text(out)
    assert main(["bench", "--from-json", str(saved), "--json", "--quiet"]) == 0
    again = _json_tail(capsys.readouterr().out)
    assert again == ci_run[0]


def test_flops_only_on_meta_device(capsys):
    rc = main(["bench", "--preset", "ci-sdxl", "--flops-only", "--json", "--quiet", "--cfg", "on"])
    assert rc == 0
    rows = _rows(_json_tail(capsys.readouterr().out))
    assert set(rows) == {(n, True) for n in ("base", "controlnext", "controlnet", "controlnext-plain")}
    assert all(r["step_seconds"] is None and r["peak_mem_bytes"] is None for r in rows.values())
    assert rows[("controlnext", True)]["flops_per_step"] > rows[("base", True)]["flops_per_step"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "ci-sdxl", "--rows", "base,controlnext-sd15-release"], "sd15 preset"),
        (["--preset", "ci", "--rows", "base,unet2"], "Unknown row"),
        (["--preset", "ci", "--resolution", "100"], "multiple of"),
        (["--preset", "ci", "--repeats", "0"], "repeats"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert main(["bench", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["bench", "--preset", "ci", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cpu_peak_memory_meter_sees_torch_allocations():
    mib = 2**20
    with _peak_new_bytes(torch.device("cpu")) as peak:
        a = torch.ones(4 * mib // 4)  # 4 MiB
        b = a * 2  # +4 MiB while both live
        del a, b
        c = torch.ones(2 * mib // 4)
        del c
    assert 8 * mib <= peak[0] < 9 * mib


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(1, 2, 16, 8)
    with torch.inference_mode(), _flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 4 * 1 * 2 * 16 * 16 * 8  # QK^T and AV, 2 FLOPs per multiply-add


def _result(preset: str, step: float) -> BenchResult:
    row = RowResult(name="base", cfg=True, batch=2, step_seconds=step, overhead=0.0, peak_mem_bytes=1)
    return BenchResult(
        preset=preset,
        family="sd15",
        resolution=512,
        device="cpu",
        dtype="float32",
        rows=[row],
        machine="test machine",
        date="2026-01-01 00:00 UTC",
        versions={"torch": "t", "diffusers": "d", "controlnext": "c", "python": "p"},
        settings={"repeats": 1, "steps": 1, "warmup": 0, "threads": 1, "tiny": False, "description": preset},
        command=f"controlnext bench --preset {preset}",
    )


def test_update_docs_replaces_only_its_section(tmp_path):
    path = tmp_path / "b.md"
    path.write_text("# Benchmarks\n\nIntro kept.\n\n<!-- bench:sections -->\n\nOutro kept.\n")
    update_docs(path, _result("sd15-512", 1.5))
    update_docs(path, _result("sdxl-512", 9.0))
    update_docs(path, _result("sd15-512", 2.5))
    text = path.read_text()
    assert text.count("<!-- bench:sd15-512-512px-cpu-float32 -->") == 1
    assert "| 2.500 |" in text and "| 1.500 |" not in text and "| 9.000 |" in text
    assert text.startswith("# Benchmarks\n\nIntro kept.") and "Outro kept." in text
    assert "controlnext bench --preset sd15-512" in render_markdown(_result("sd15-512", 1.0))


def test_script_entry_point():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--preset" in out.stdout and "sd15-512" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "ci", "--compile", "no-such-backend"], "Unknown torch.compile backend"),
        (["--preset", "ci", "--compile", "eager", "--flops-only"], "cannot be combined with --flops-only"),
    ],
)
def test_bad_compile_arguments_are_one_line_errors(args, message, capsys):
    assert main(["bench", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compile_is_in_the_regenerate_command_and_old_json_still_reads():
    from controlnext.bench import BenchConfig, command_line

    cfg = BenchConfig(preset="ci", compile="inductor", guidance=(True,)).resolved()
    assert "--compile inductor" in command_line(cfg)
    # Results saved before the compile fields existed still load (the new fields default to None).
    row = {"name": "base", "cfg": True, "batch": 2}
    old = dict(preset="ci", family="sd15", resolution=64, device="cpu", dtype="float32", rows=[row], machine="m")
    old.update(date="d", versions={}, settings={}, command="c")
    assert BenchResult.from_json(json.dumps(old)).rows[0].compile_seconds is None


def test_step_clock_times_host_work():
    import time

    from controlnext.bench import StepClock

    clock = StepClock("cpu")
    clock.start()
    time.sleep(0.02)
    assert 0.015 < clock.stop() < 1.0


def test_timestep_free_row_pays_only_cross_norm_per_step(capsys):
    """The timestep-free module's whole encoder runs once per generation: no per-step encoder FLOPs remain."""
    rc = main(["bench", "--preset", "ci", "--flops-only", "--json", "--quiet", "--cfg", "on",
               "--rows", "base,controlnext,controlnext-timestep-free"])  # fmt: skip
    assert rc == 0
    rows = _rows(_json_tail(capsys.readouterr().out))
    base, timed, free = (rows[(n, True)] for n in ("base", "controlnext", "controlnext-timestep-free"))
    # Cross Normalization's mean/std are not FLOP-counted ops, so the step costs exactly the base's FLOPs ...
    assert free["flops_per_step"] == base["flops_per_step"] < timed["flops_per_step"]
    # ... and the encoder's work moved into the once-per-generation preparation.
    assert free["prepare_flops"] > timed["prepare_flops"] > 0
    assert 0 < free["added_params"] < timed["added_params"]  # no timestep embedding
