"""Exact resume, atomic checkpoints and crashes while writing them (select with `pytest -k resume`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from controlnext.training import checkpoint as ckpt
from controlnext.training import parse_train_args, train

# Everything that draws randomness or carries state: flips, caption dropout, a warm-up + cosine schedule, gradient
# accumulation (with a partial last accumulation in each epoch), EMA, min-SNR weighting and noise offset.
RICH = [
    "--random-flip", "--caption-dropout", "0.3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2",
    "--gradient-accumulation-steps", "3", "--use-ema", "--ema-decay", "0.9", "--snr-gamma", "5",
    "--noise-offset", "0.05",
]  # fmt: skip


def _args(base, data, out, *extra):
    return [
        "--pretrained-model", str(base), "--dataset", str(data), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "4", "--learning-rate", "1e-3",
        "--unet-learning-rate", "1e-3", "--cpu-threads", "1", "--report-to", "none", *extra,
    ]  # fmt: skip


def _weights(out):
    return {**load_file(out / "controlnext.safetensors"), **load_file(out / "unet_weights.safetensors")}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs")


@pytest.fixture(scope="module")
def straight(sd15, shapes, tmp_path_factory):
    """The uninterrupted reference: 8 steps (3 epochs of 3 updates), checkpoints every 2 steps, at most 2 kept."""
    out = tmp_path_factory.mktemp("straight")
    args = _args(sd15, shapes, out, *RICH, "--max-train-steps", "8", "--checkpointing-steps", "2")
    result = train(parse_train_args([*args, "--checkpoints-total-limit", "2"]))
    return result, out


def test_resume_exactly_matches_uninterrupted_run(sd15, shapes, straight, tmp_path):
    ref, ref_out = straight
    out = tmp_path / "split"
    args = _args(sd15, shapes, out, *RICH, "--max-train-steps", "8", "--checkpointing-steps", "2")
    first = train(parse_train_args([*args, "--exit-after-steps", "4"]))  # stops mid-epoch (epoch 1, after 1 update)
    assert first.global_step == 4 and not (out / "controlnext.safetensors").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    second = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    assert second.global_step == 8
    # Same losses step by step, and bit-identical final (EMA) weights: the resumed run replays the same data
    # order, augmentations, noise, optimizer and scheduler state.
    assert first.losses + second.losses == ref.losses
    _assert_same(_weights(out), _weights(ref_out))
    assert second.rank_fingerprints == ref.rank_fingerprints


def test_resume_from_an_explicit_checkpoint_path_and_total_limit(sd15, shapes, straight, tmp_path):
    ref, ref_out = straight
    root = ref_out / "checkpoints"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [6, 8]  # --checkpoints-total-limit 2
    assert ckpt.latest_checkpoint(root) == root / "checkpoint-8"
    out = tmp_path / "from6"
    args = _args(sd15, shapes, out, *RICH, "--max-train-steps", "8", "--checkpointing-steps", "2")
    result = train(parse_train_args([*args, "--resume-from-checkpoint", str(root / "checkpoint-6")]))
    assert result.losses == ref.losses[6:]
    _assert_same(_weights(out), _weights(ref_out))


def test_resume_latest_without_checkpoint_starts_fresh_and_damage_is_detected(sd15, shapes, tmp_path, capsys):
    out = tmp_path / "fresh"
    # One checkpoint only (step 2): with an older intact one, resuming would fall back to it (tested below).
    args = _args(sd15, shapes, out, "--max-train-steps", "2", "--checkpointing-steps", "2")
    result = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    assert result.global_step == 2 and "no checkpoint in" in capsys.readouterr().out
    damaged = out / "checkpoints" / "checkpoint-2" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint-2 is damaged: trainable.safetensors has 100 bytes"):
        train(parse_train_args([*args, "--max-train-steps", "3", "--resume-from-checkpoint", "latest"]))


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import accelerate.checkpointing as ac
    from controlnext.training import checkpoint, parse_train_args, train

    where, step = sys.argv[1], sys.argv[2]
    tmp_name = f".tmp-checkpoint-{step}"

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "mid_write":  # our weights are written, accelerate's optimizer state is not
        real_save = ac.save

        def save(obj, f, *a, **k):
            if tmp_name in str(f):
                die()
            return real_save(obj, f, *a, **k)

        ac.save = save
    else:  # everything written and flushed, killed just before the rename that commits it
        real_commit = checkpoint._commit

        def commit(tmp, final):
            if tmp.name == tmp_name:
                die()
            return real_commit(tmp, final)

        checkpoint._commit = commit
    train(parse_train_args(sys.argv[3:]))
    """
)


@pytest.mark.parametrize("where", ["mid_write", "before_rename"])
def test_resume_after_process_killed_while_writing_checkpoint(sd15, shapes, straight, tmp_path, where):
    ref, ref_out = straight
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    out = tmp_path / "crashed"
    args = _args(sd15, shapes, out, *RICH, "--max-train-steps", "8", "--checkpointing-steps", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(script), where, "4", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / ".tmp-checkpoint-4").is_dir() and not (root / "checkpoint-4").exists()
    assert (root / "latest").read_text().strip() == "checkpoint-2"
    ckpt.verify_checkpoint(root / "checkpoint-2")  # the previous checkpoint is intact
    result = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    assert not (root / ".tmp-checkpoint-4").exists()  # the partial write was cleaned up
    assert result.losses == ref.losses[2:]
    _assert_same(_weights(out), _weights(ref_out))


def test_resume_after_failure_injected_between_write_and_rename(sd15, shapes, tmp_path, monkeypatch):
    out = tmp_path / "inject"
    args = _args(sd15, shapes, out, "--max-train-steps", "4", "--checkpointing-steps", "2")
    real = ckpt._commit

    def failing(tmp, final):
        if final.name == "checkpoint-4":
            raise OSError("disk full (injected)")
        return real(tmp, final)

    monkeypatch.setattr(ckpt, "_commit", failing)
    with pytest.raises(OSError, match="injected"):
        train(parse_train_args(args))
    monkeypatch.setattr(ckpt, "_commit", real)
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "checkpoint-2"
    result = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    assert result.global_step == 4 and len(result.losses) == 2


def test_resume_atomic_pointer_and_prune_helpers(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    for step in (1, 2, 3):
        (root / f"checkpoint-{step}").mkdir()
        (root / f"checkpoint-{step}" / "checkpoint.json").write_text(f'{{"step": {step}, "files": {{}}}}')
    (root / "checkpoint-4").mkdir()  # no manifest: never a valid target
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [1, 2, 3]
    assert ckpt.latest_checkpoint(root).name == "checkpoint-3"  # no pointer yet: newest complete
    ckpt.write_text_atomic(root / "latest", "checkpoint-2\n")
    assert ckpt.latest_checkpoint(root).name == "checkpoint-2"
    assert not list(root.glob(".latest*"))  # no temporary file left
    ckpt.prune_checkpoints(root, 1, keep=root / "checkpoint-2")
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2]
    # A crash between moving an older copy of a step aside and the rename: the old copy is restored.
    shutil.move(root / "checkpoint-2", root / ".old-checkpoint-2")
    (root / ".tmp-checkpoint-5").mkdir()
    ckpt.remove_partial(root)
    assert (root / "checkpoint-2").is_dir() and not (root / ".tmp-checkpoint-5").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.verify_checkpoint(root / "checkpoint-4")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "nope"), root)


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("controlnext train: error:")]


def _flip(path, offset, count=16):
    """Invert ``count`` bytes of ``path`` at ``offset`` (negative: from the end); the size stays the same."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_resume_detects_changed_bytes_and_falls_back_to_the_newest_intact_checkpoint(
    sd15, shapes, straight, tmp_path, caplog, where
):
    ref, ref_out = straight
    out = tmp_path / "damaged"
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")
    damaged = out / "checkpoints" / "checkpoint-8" / "trainable.safetensors"
    size = damaged.stat().st_size
    _flip(damaged, -64 if where == "tensor data" else 12)
    assert damaged.stat().st_size == size
    args = _args(sd15, shapes, out, *RICH, "--max-train-steps", "8", "--checkpointing-steps", "2")
    with caplog.at_level("WARNING", logger="controlnext.train"):
        result = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-6" in warning and "checkpoint-8 is damaged" in warning and "SHA-256" in warning
    assert "trainable.safetensors" in warning
    # Resumed from step 6: steps 7 and 8 replayed exactly, and the damaged checkpoint-8 replaced by a good one.
    assert result.losses == ref.losses[6:]
    _assert_same(_weights(out), _weights(ref_out))
    ckpt.verify_checkpoint(out / "checkpoints" / "checkpoint-8")


def test_resume_with_no_intact_checkpoint_is_one_clear_error(sd15, shapes, straight, tmp_path, capsys):
    from controlnext.cli import main as cli_main

    _, ref_out = straight
    out = tmp_path / "all-damaged"
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")
    _flip(out / "checkpoints" / "checkpoint-8" / "trainable.safetensors", 12)
    _flip(out / "checkpoints" / "checkpoint-6" / "optimizer.bin", -100)
    args = _args(sd15, shapes, out, "--max-train-steps", "8", "--resume-from-checkpoint", "latest")
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and _error_lines(err) == [err.splitlines()[-1]], err
    assert "No intact checkpoint in" in err and "optimizer.bin changed" in err and "trainable.safetensors" in err
    # A checkpoint named explicitly is not replaced by another one.
    explicit = ["--resume-from-checkpoint", str(out / "checkpoints" / "checkpoint-8")]
    assert cli_main(["train", *args[:-2], *explicit]) == 2
    assert "checkpoint-8 is damaged: the content of trainable.safetensors changed" in capsys.readouterr().err


def test_checkpoint_and_output_weights_are_readable_like_other_files(straight, tmp_path):
    _, out = straight
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # what the umask gives any new file (0644 under umask 022)
    mode = reference.stat().st_mode & 0o777
    weights = [
        out / "controlnext.safetensors",
        out / "unet_weights.safetensors",
        *(out / "controlnext").glob("*.safetensors"),
        *(out / "checkpoints" / "checkpoint-8").glob("*.safetensors"),
    ]
    assert len(weights) == 5  # module file, UNet subset, module folder, trainable + EMA in the checkpoint
    for path in weights:
        assert path.stat().st_mode & 0o777 == mode, path


LOCK_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from controlnext.training import checkpoint, parse_train_args, train

    real_commit = checkpoint._commit

    def commit(tmp, final):  # hold the run (and its temporary checkpoint) until the test kills it
        print("WRITING", tmp, flush=True)
        time.sleep(600)

    checkpoint._commit = commit
    train(parse_train_args(sys.argv[1:]))
    """
)


def test_second_run_into_a_used_folder_is_refused_and_a_killed_run_leaves_no_lock(sd15, shapes, tmp_path, capsys):
    from controlnext.cli import main as cli_main

    script = tmp_path / "hold.py"
    script.write_text(LOCK_SCRIPT)
    out = tmp_path / "shared"
    args = _args(sd15, shapes, out, "--max-train-steps", "2", "--checkpointing-steps", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    first = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        # Read until the first run is writing its checkpoint (EOF if it failed instead).
        assert any(line.startswith("WRITING") for line in first.stdout), "the first run ended early"
        assert (out / "checkpoints" / ".tmp-checkpoint-1").is_dir()
        assert cli_main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(_error_lines(err)) == 1, err
        assert "is in use by another training run" in _error_lines(err)[0]
        assert (out / "checkpoints" / ".tmp-checkpoint-1").is_dir()  # the first run's files are untouched
    finally:
        first.kill()
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # The killed run's lock went with it: the next run proceeds (and removes its left-over temporary folder).
    result = train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))
    assert result.global_step == 2 and not (out / "checkpoints" / ".tmp-checkpoint-1").exists()


def _header(path):
    """The raw header of a .safetensors file, keys in file order."""
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n], object_pairs_hook=list)


def test_export_is_all_or_nothing_and_byte_reproducible(tmp_path, monkeypatch):
    from controlnext.testing import tiny_controlnext
    from controlnext.training import export

    module = tiny_controlnext("sd15-training")
    state = {f"controlnext.{k}": v for k, v in module.state_dict().items()}
    state["unet.up.to_out.weight"] = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    names = ["controlnext.safetensors", "unet_weights.safetensors", "controlnext/diffusion_pytorch_model.safetensors"]

    # Identical tensors give identical files: metadata is written in sorted order, not hash-map order.
    for i in range(6):
        export.export_outputs(tmp_path / f"r{i}", module.config, state, None)
    for name in names:
        blobs = {(tmp_path / f"r{i}" / name).read_bytes() for i in range(6)}
        assert len(blobs) == 1, name
        meta = dict(_header(tmp_path / "r0" / name))["__metadata__"]
        assert [k for k, _ in meta] == sorted(k for k, _ in meta), name

    def failing(module, path):  # the export is interrupted after the module folder was written
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export, "save_control_file", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="injected"):
        export.export_outputs(fresh, module.config, state, None)
    assert sorted(p.name for p in fresh.iterdir()) == []  # no partial controlnext/ folder, no temporary one
    # Over an earlier export: every earlier file is kept as it was.
    before = {name: (tmp_path / "r0" / name).read_bytes() for name in names}
    changed = {k: v + 1 for k, v in state.items()}
    with pytest.raises(OSError, match="injected"):
        export.export_outputs(tmp_path / "r0", module.config, changed, None)
    assert {name: (tmp_path / "r0" / name).read_bytes() for name in names} == before
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == ["controlnext", *sorted(names[:2])]


def test_a_changed_manifest_is_detected_and_old_size_only_manifests_still_verify(straight, tmp_path):
    import json

    _, ref_out = straight
    folder = tmp_path / "checkpoint-8"
    shutil.copytree(ref_out / "checkpoints" / "checkpoint-8", folder)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    (folder / "checkpoint.json").write_text(json.dumps({**manifest, "step": 7}))  # still valid JSON
    with pytest.raises(ValueError, match="checkpoint.json is damaged: its content changed"):
        ckpt.verify_checkpoint(folder)
    # A manifest of the earlier format (sizes only, no hashes) is checked by size.
    old = {"step": 8, "files": {rel: entry["size"] for rel, entry in manifest["files"].items()}}
    (folder / "checkpoint.json").write_text(json.dumps(old))
    assert ckpt.verify_checkpoint(folder)["step"] == 8
