"""Two-process training through `accelerate launch` on the CPU (gloo); select with `pytest -k distributed`.

accelerate starts several CPU processes only through mpirun with `--cpu`; with a multi-GPU config it starts them with
torchrun, and on a machine without GPUs the trainer (or its `--cpu` flag) makes them one gloo process group. Every
file of configs/accelerate/ runs here, with `--num_processes 2 --mixed_precision no` on the command line: DDP
(8gpu.yaml), two machines of one process each on localhost (multinode.yaml), FSDP2 (fsdp.yaml), DeepSpeed ZeRO-2
and ZeRO-3 (deepspeed_zero2.yaml, with --zero_stage 3 --zero3_save_16bit_model true for ZeRO-3; DeepSpeed's CPU
accelerator) and one process (1gpu.yaml).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from controlnext.training import checkpoint as ckpt
from controlnext.training import parse_train_args, train


def _args(base, data, out, batch, *extra):
    return [
        "--pretrained-model", str(base), "--dataset", str(data), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", str(batch), "--learning-rate", "1e-3",
        "--unet-learning-rate", "1e-3", "--cpu-threads", "1", "--report-to", "none", "--max-train-steps", "6",
        "--checkpointing-steps", "3", "--random-flip", "--caption-dropout", "0.3", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _command(args: list[str], config: str, processes: int = 2, *launch: str) -> list[str]:
    accelerate = Path(sys.executable).parent / "accelerate"
    return [
        str(accelerate), "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
        "--mixed_precision", "no", "--dynamo_backend", "no", *launch, "-m", "controlnext.train", "--cpu", *args,
    ]  # fmt: skip


def _env() -> dict:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator (it talks gloo when oneCCL's torch bindings are not installed).
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")


def _launch(args: list[str], config: str = "8gpu.yaml", processes: int = 2, *launch: str):
    port = ["--main_process_port", str(_free_port())] if processes > 1 else []
    cmd = _command(args, config, processes, "--num_machines", "1", *port, *launch)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {**load_file(out / "controlnext.safetensors"), **load_file(out / "unet_weights.safetensors")}


@pytest.fixture(scope="module")
def two_process_run(sd15, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = _launch(_args(sd15, shapes, out, 2))
    return out, proc


def test_distributed_two_processes_end_with_identical_weights(two_process_run):
    out, proc = two_process_run
    assert "batch 2 x 2 process(es)" in proc.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    prints = summary["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]  # SHA-256 of every trained tensor, per rank
    assert summary["steps"] == 6


def test_distributed_matches_one_process_with_the_same_global_batch(sd15, shapes, two_process_run, tmp_path):
    out, _ = two_process_run
    single = train(parse_train_args(_args(sd15, shapes, tmp_path / "single", 4)))
    ddp_summary = json.loads((out / "train_summary.json").read_text())
    # Same samples, noise and timesteps per global batch position; only float summation order differs.
    assert abs(ddp_summary["final_loss"] - sum(single.losses) / len(single.losses)) < 1e-5
    a, b = _weights(out), _weights(tmp_path / "single")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - w).abs().max().item() for k, w in _initial_control(tmp_path, sd15, shapes).items())
    assert worst < 5e-4 < moved, (worst, moved)


def _initial_control(tmp_path, sd15, shapes) -> dict[str, torch.Tensor]:
    """The control module before any update (same seed), to show the runs really trained."""
    from controlnext.training.base import load_base_model
    from controlnext.training.loop import _make_controlnext

    cfg = parse_train_args(_args(sd15, shapes, tmp_path / "init", 4))
    module = _make_controlnext(cfg, load_base_model(str(sd15)).unet, "sd15")
    return {k: v for k, v in module.state_dict().items()}


def test_distributed_resume_replays_the_same_run(sd15, shapes, two_process_run, tmp_path):
    out, _ = two_process_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    ckpt.write_text_atomic(resumed / "checkpoints" / "latest", "checkpoint-3\n")
    proc = _launch(_args(sd15, shapes, resumed, 2, "--resume-from-checkpoint", "latest"))
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    a, b = _weights(out), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- FSDP2, DeepSpeed
def _losses(out: Path) -> list[float]:
    """Every step's loss, as the last checkpoint records it."""
    state = json.loads((out / "checkpoints" / ckpt.latest_checkpoint(out / "checkpoints").name / "train_state.json")
                       .read_text())  # fmt: skip
    return [loss for _, loss in state["losses"]]


def _layout(path: Path) -> tuple[dict, dict]:
    """Keys with shapes and dtypes, and the metadata, of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}, f.metadata()


def _assert_matches_ddp(out: Path, ddp: Path, atol: float) -> None:
    np_losses = torch.tensor(_losses(out)), torch.tensor(_losses(ddp))
    assert len(np_losses[0]) == 6
    torch.testing.assert_close(*np_losses, rtol=0, atol=1e-5)  # the same loss curve
    a, b = _weights(out), _weights(ddp)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.fixture(scope="module")
def fsdp_run(sd15, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = _launch(_args(sd15, shapes, out, 2), "fsdp.yaml")
    return out, proc


def test_distributed_fsdp2_matches_ddp_and_checkpoints_sharded(fsdp_run, two_process_run):
    out, proc = fsdp_run
    assert "batch 2 x 2 process(es)" in proc.stdout
    _assert_matches_ddp(out, two_process_run[0], atol=1e-4)  # measured: 4e-6 (reduce-scatter vs all-reduce order)
    checkpoint = out / "checkpoints" / "checkpoint-3"
    files = ckpt.verify_checkpoint(checkpoint)["files"]
    assert any(f.startswith("pytorch_model_fsdp_0/") for f in files)  # the sharded model (torch.distributed.checkpoint)
    assert any(f.startswith("optimizer_0/") for f in files) and "train_state.json" in files


def test_distributed_fsdp2_export_has_the_single_process_layout(sd15, shapes, fsdp_run, tmp_path):
    single = tmp_path / "single"
    _launch(_args(sd15, shapes, single, 4), "1gpu.yaml", processes=1)
    out, _ = fsdp_run
    for name in ("controlnext.safetensors", "unet_weights.safetensors"):
        assert _layout(out / name) == _layout(single / name), name
    config = json.loads((out / "controlnext" / "config.json").read_text())
    assert config == json.loads((single / "controlnext" / "config.json").read_text())


def test_distributed_fsdp2_resume_replays_the_same_run(sd15, shapes, fsdp_run, tmp_path):
    _resume_replays(fsdp_run[0], sd15, shapes, tmp_path / "resumed", "fsdp.yaml")


@pytest.fixture(scope="module")
def zero2_run(sd15, shapes, tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero2")
    _launch(_args(sd15, shapes, out, 2), "deepspeed_zero2.yaml")
    return out


def test_distributed_deepspeed_zero2_on_cpu_matches_ddp(zero2_run, two_process_run):
    _assert_matches_ddp(zero2_run, two_process_run[0], atol=1e-4)  # measured: identical
    files = ckpt.verify_checkpoint(zero2_run / "checkpoints" / "checkpoint-6")["files"]
    assert any(f.startswith("pytorch_model/") for f in files)  # DeepSpeed's own checkpoint inside ours


def _resume_replays(run: Path, sd15, shapes, resumed: Path, config: str, *launch: str) -> None:
    """Resume ``run``'s step-3 checkpoint in a new folder: the same losses and bit-identical final weights."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    proc = _launch(_args(sd15, shapes, resumed, 2, "--resume-from-checkpoint", "latest"), config, 2, *launch)
    assert "at step 3" in proc.stdout and _losses(resumed) == _losses(run)
    a, b = _weights(run), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_distributed_deepspeed_zero2_resume_replays_the_same_run(sd15, shapes, zero2_run, tmp_path):
    _resume_replays(zero2_run, sd15, shapes, tmp_path / "zero2-resumed", "deepspeed_zero2.yaml")


# ZeRO-3 from the ZeRO-2 file; the 16-bit gather lets the export collect the sharded weights.
ZERO3 = ("--zero_stage", "3", "--zero3_save_16bit_model", "true")


@pytest.fixture(scope="module")
def zero3_run(sd15, shapes, tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3")
    _launch(_args(sd15, shapes, out, 2), "deepspeed_zero2.yaml", 2, *ZERO3)
    return out


def test_distributed_deepspeed_zero3_on_cpu_matches_ddp(zero3_run, two_process_run):
    _assert_matches_ddp(zero3_run, two_process_run[0], atol=1e-4)  # measured: 4e-6


def test_distributed_deepspeed_zero3_resume_replays_the_same_run(sd15, shapes, zero3_run, tmp_path):
    _resume_replays(zero3_run, sd15, shapes, tmp_path / "zero3-resumed", "deepspeed_zero2.yaml", *ZERO3)


def test_distributed_two_machines_on_localhost_equal_two_processes(sd15, shapes, two_process_run, tmp_path):
    """multinode.yaml: one process on each of two "machines" (localhost), the same result as one machine's two."""
    out = tmp_path / "nodes"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            _command(_args(sd15, shapes, out, 2), "multinode.yaml", 2, "--num_machines", "2", "--machine_rank",
                     str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    a, b = _weights(out), _weights(two_process_run[0])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- transformer families
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_distributed_transformer_family_matches_one_process(family, shapes, tmp_path):
    """SD3 and Flux (flow matching, T5 prompts) under two DDP processes: ranks agree, and the run equals one process
    with the same global batch (same samples, noise and timesteps per global position) up to float summation order."""
    from controlnext.testing.data import write_tiny_base

    base = write_tiny_base(tmp_path / "base", family)
    args = lambda out, batch: [*_args(base, shapes, out, batch, "--max-sequence-length", "8")]  # noqa: E731
    proc = _launch(args(tmp_path / "ddp", 2))
    assert "batch 2 x 2 process(es)" in proc.stdout
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert len(summary["rank_fingerprints"]) == 2 and len(set(summary["rank_fingerprints"])) == 1
    single = train(parse_train_args(args(tmp_path / "single", 4)))
    assert abs(summary["final_loss"] - sum(single.losses) / len(single.losses)) < 1e-5
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert a.keys() == b.keys() and any(k.startswith("transformer_blocks.") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 5e-4, worst
