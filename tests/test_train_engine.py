"""The shared training core (training/engine.py): one loop for both trainers, and the data-position protocol that
streaming datasets plug into (set_epoch / state_dict / load_state_dict, stored per process in each checkpoint)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controlnext.testing.models import tiny_controlnext, tiny_unet
from controlnext.training import checkpoint as ckpt
from controlnext.training import engine
from controlnext.training.core import ControlledBackbone
from controlnext.training.trainable import apply_trainable, parameter_groups, select_unet_parameters

N, BATCH = 8, 2  # 4 steps per epoch: 6 steps cross an epoch boundary


class Stream:
    """A stand-in for a streaming reader: a seeded order per epoch, the position a sample counter."""

    def __init__(self):
        self.epoch, self.offset, self.calls = 0, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(("set_epoch", epoch))
        self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.calls.append(("load_state_dict", state))
        self.epoch, self.offset = state["epoch"], state["offset"]

    def batches(self):
        order = np.random.default_rng([7, self.epoch]).permutation(N)
        while self.offset + BATCH <= N:
            index = order[self.offset : self.offset + BATCH]
            self.offset += BATCH  # the position after the batches the loop has taken
            yield {"index": torch.as_tensor(index)}


def _loss(table):
    x, cond, t = table

    def loss(model, batch, step, micro):
        i = batch["index"]
        pred = model(x[i], t[i], encoder_hidden_states=torch.zeros(len(i), 4, 32), condition=cond[i])
        return F.mse_loss(pred, x[i].flip(1))

    return loss


def _run(out, stream, skips, resume=None, **settings):
    accelerator = engine.make_accelerator(out, cpu=True)
    model = ControlledBackbone(tiny_unet("sd15"), tiny_controlnext("sd15-training", out_channels=32))
    names = select_unet_parameters(model.unet, ["to_out"])
    apply_trainable(model.unet, model.controlnext, names)
    groups = parameter_groups(model.unet, model.controlnext, names, 1e-3, 1e-3)
    optimizer = engine.make_optimizer(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    scheduler = engine.make_lr_scheduler("constant", optimizer, warmup_steps=0, max_steps=6, num_processes=1)
    loop = engine.LoopSettings(max_steps=6, max_grad_norm=1.0, checkpointing_steps=3, **settings)
    trainer = engine.Trainer(accelerator, model, names, optimizer, scheduler, loop, output_dir=out,
                             resume_key={"seed": 0})  # fmt: skip
    trainer.resume(resume)
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(N, 4, 8, 8, generator=g), torch.rand(N, 3, 64, 64, generator=g), torch.arange(N) * 100)

    def batches(epoch, skip):
        skips.append(skip)
        return stream.batches()

    trainer.run(engine.TrainData(batches, updates_per_epoch=N // BATCH, dataset=stream), _loss(table))
    trainer.finish()
    state = trainer.trainable_state()
    engine.release_accelerate_state()
    return trainer, state


def test_streaming_position_is_checkpointed_per_process_and_restored_exactly(tmp_path):
    straight_stream, skips = Stream(), []
    straight, want = _run(tmp_path / "a", straight_stream, skips)
    assert straight.state.global_step == 6 and skips == [0, 0]
    assert [c for c in straight_stream.calls if c[0] == "set_epoch"] == [("set_epoch", 0), ("set_epoch", 1)]

    first, skips = Stream(), []
    _run(tmp_path / "b", first, skips, exit_after_steps=3)
    folder = tmp_path / "b" / "checkpoints" / "checkpoint-3"
    assert json.loads((folder / "data_state.rank0.json").read_text()) == {"epoch": 0, "offset": 6}
    assert "data_state.rank0.json" in ckpt.verify_checkpoint(folder)["files"]  # hashed with the rest

    resumed_stream, skips = Stream(), []
    resumed, got = _run(tmp_path / "b", resumed_stream, skips, resume="latest")
    # set_epoch of the resumed epoch, then the saved position; the core skips nothing itself.
    assert resumed_stream.calls[:2] == [("set_epoch", 0), ("load_state_dict", {"epoch": 0, "offset": 6})]
    assert skips == [0, 0] and resumed.state.global_step == 6
    assert resumed.new_losses == straight.new_losses[3:]
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_without_a_saved_position_the_core_skips_the_consumed_batches(tmp_path):
    first, skips = Stream(), []
    _run(tmp_path / "c", first, skips, exit_after_steps=3)
    (tmp_path / "c" / "checkpoints" / "checkpoint-3" / "data_state.rank0.json").unlink()
    manifest = tmp_path / "c" / "checkpoints" / "checkpoint-3" / ckpt.MANIFEST
    data = json.loads(manifest.read_text())
    del data["files"]["data_state.rank0.json"]
    data[ckpt._SELF_HASH] = ckpt._manifest_hash(data)
    manifest.write_text(json.dumps(data))
    skips = []
    _run(tmp_path / "c", Stream(), skips, resume="latest")
    assert skips[0] == 3  # three micro-batches of the epoch were consumed before the checkpoint


@pytest.mark.parametrize("module", ["controlnext.training.loop", "controlnext.training.video.loop"])
def test_both_trainers_use_the_one_loop(module):
    """The accumulate-step loop, the optimizer step and checkpoint writing live in the core only."""
    import importlib

    source = inspect.getsource(importlib.import_module(module))
    for needle in ("accelerator.accumulate", "optimizer.step()", "save_checkpoint(", "accelerator.backward"):
        assert needle not in source, needle
    assert "Trainer(" in source and ".run(" in source


def _profile_args(sd15, shapes, out):
    return [
        "--model", str(sd15), "--dataset", str(shapes), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "4", "--cpu-threads", "1", "--report-to", "none",
        "--max-train-steps", "100", "--checkpointing-steps", "2", "--profile", "4",
    ]  # fmt: skip


def test_profile_reports_rates_data_wait_and_memory_then_stops(sd15, shapes, tmp_path, capsys, monkeypatch):
    import time

    from controlnext.training import loop, parse_train_args, train

    run = train(parse_train_args(_profile_args(sd15, shapes, tmp_path / "p")))
    (row,) = run.profile
    assert run.global_step == 4 and row["steps_measured"] == 3  # the start-up step is left out
    assert row["samples_per_second"] > 0 and 0 <= row["data_wait_share"] <= row["data_wait_share_max"] <= 1
    assert row["peak_memory_mib"] > 50 and row["memory"] == "RSS"
    out = capsys.readouterr().out
    assert "samples/s" in out and "data wait" in out and "MiB (RSS)" in out
    assert json.loads((tmp_path / "p" / "profile.json").read_text()) == run.profile
    assert not (tmp_path / "p" / "checkpoints").exists() and not (tmp_path / "p" / "controlnext.safetensors").exists()

    real = loop.collate

    def slow(samples):  # a data path slower than the step: the wait must show
        time.sleep(0.5)
        return real(samples)

    monkeypatch.setattr(loop, "collate", slow)
    (slow_row,) = train(parse_train_args(_profile_args(sd15, shapes, tmp_path / "slow"))).profile
    assert slow_row["data_wait_share"] > 0.5 > row["data_wait_share"], (slow_row, row)
    with pytest.raises(ValueError, match="--profile must be >= 1, got 0"):
        train(parse_train_args(_profile_args(sd15, shapes, tmp_path / "x")[:-1] + ["0"]))


def test_fsdp_units_inside_the_control_module_are_refused():
    model = ControlledBackbone(tiny_unet("sd15"), tiny_controlnext("sd15-training", out_channels=32))
    block = model.controlnext.down_res[0]
    block.__class__ = type("FSDPResnetBlock2D", (type(block),), {})  # what fully_shard does to a wrapped module
    with pytest.raises(ValueError, match="FSDP wrapped parts of the control module"):
        engine._check_control_unit(model)


def test_sharded_weight_check_stops_every_process_when_any_shard_is_bad():
    from controlnext.training.guards import NonFiniteError, check_weights

    mine = [("controlnext.scale", torch.ones(2))]  # this process's shards are fine
    check_weights(mine, 3, None, gather=lambda bad: bad)
    with pytest.raises(NonFiniteError, match=r"\['unet.to_out'\]"):  # another process found a NaN in its shard
        check_weights(mine, 3, None, gather=lambda bad: bad + ["unet.to_out"])
