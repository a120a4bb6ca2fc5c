"""Two-process training through `accelerate launch` on the CPU (gloo); select with `pytest -k distributed`.

accelerate starts several CPU processes only through mpirun with `--cpu`; with `--multi_gpu` it starts them with
torchrun, and on a machine without GPUs the trainer (or its `--cpu` flag) makes them one gloo process group.
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


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "controlnext.train", "--cpu", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
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
