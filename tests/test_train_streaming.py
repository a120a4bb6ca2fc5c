"""`controlnext train` on streamed shards: kill -9 at random steps and exact resume, bad samples in the run summary
(select with `pytest -k streaming`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from controlnext.training import parse_train_args, train
from controlnext.training import shards as sh
from controlnext.training.data import open_source, scan_rows

# Randomness and state everywhere: flips, caption dropout, warm-up + cosine, accumulation with a partial last
# accumulation per epoch, 2 data-loader workers, a shuffle buffer smaller than a worker's share.
RICH = [
    "--random-flip", "--caption-dropout", "0.3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2",
    "--gradient-accumulation-steps", "2", "--dataloader-num-workers", "2", "--shuffle-buffer", "5",
]  # fmt: skip


def _args(base, data, out, *extra):
    return [
        "--model", str(base), "--dataset", str(data), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "3", "--learning-rate", "1e-3",
        "--unet-learning-rate", "1e-3", "--cpu-threads", "1", "--report-to", "none", *extra,
    ]  # fmt: skip


def _weights(out):
    return {**load_file(out / "controlnext.safetensors"), **load_file(out / "unet_weights.safetensors")}


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream-shards")
    source = open_source(str(shapes))
    rows = scan_rows(source).good
    sh.write_shards([lambda i=i: sh.sample_members(source.raw(i)) for i in rows], out, len(rows), 7, progress=False)
    return out


def _killed_at(step, args):
    """Run training in a child process that kills itself with SIGKILL when it starts step ``step``."""

    def child():
        import controlnext.training.engine as loop  # the core checks every micro-batch's loss

        real = loop.check_loss

        def check(loss, number, last_good):  # called for every micro-batch, with the step it belongs to
            if number == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(loss, number, last_good)

        loop.check_loss = check
        train(parse_train_args(args))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL


def test_streaming_kill9_at_random_steps_then_resume_is_bit_identical(sd15, shard_dir, tmp_path):
    # 32 samples in batches of 3: 11 batches per epoch, 6 updates (the last one of a single batch); 9 steps.
    common = [*RICH, "--max-train-steps", "9", "--checkpointing-steps", "2"]
    ref = train(parse_train_args(_args(sd15, shard_dir, tmp_path / "straight", *common)))
    assert ref.global_step == 9
    out = tmp_path / "killed"
    args = _args(sd15, shard_dir, out, *common, "--resume-from-checkpoint", "latest")
    kills = sorted(random.Random(20).sample(range(3, 10), 3))  # e.g. mid-epoch and just after the epoch boundary
    for step in kills:
        _killed_at(step, args)
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"checkpoint-{(step - 1) // 2 * 2}"
        state = json.loads((out / "checkpoints" / latest / "data_state.rank0.json").read_text())
        assert state["workers"] == 2 and sum(p[1] for p in state["positions"].values()) == state["batches"]
    resumed = train(parse_train_args(args))
    assert resumed.global_step == 9
    # The epoch's partial accumulation is applied at its end, as with map-style data: step 6 closes epoch 0.
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "data_state.rank0.json").read_text())
    assert (state["epoch"], state["batches"]) == (0, 11)
    assert resumed.losses == ref.losses[-len(resumed.losses) :]
    a, b = _weights(out), _weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs")


def test_streaming_bad_samples_are_counted_in_the_run_summary(sd15, shard_dir, tmp_path):
    import shutil

    folder = tmp_path / "with-bad"
    shutil.copytree(shard_dir, folder)
    (folder / sh.INDEX_FILE).unlink()  # counted from the tar headers
    import webdataset as wds

    with wds.TarWriter(str(folder / "zz-bad.tar"), encoder=False) as writer:
        writer.write({"__key__": "nocond", "image.png": (shard_dir / "shard-000000.tar").read_bytes()[:10]})
        writer.write({"__key__": "corrupt", "image.png": b"\x89PNG broken", "conditioning_image.png": b"x"})
    data = (folder / "shard-000004.tar").read_bytes()
    (folder / "shard-000004.tar").write_bytes(data[: len(data) // 2])  # truncated
    out = tmp_path / "out"
    result = train(parse_train_args(_args(sd15, folder, out)))  # one epoch: every sample is read
    summary = json.loads((out / "train_summary.json").read_text())
    reasons = {row_id: why for row_id, why in summary["bad_rows"]}
    assert "shard-000004.tar" in reasons and "truncated" in reasons["shard-000004.tar"]
    assert "no condition member" in reasons["zz-bad.tar:nocond"]
    assert "zz-bad.tar:corrupt" in reasons
    # 28 + 3 + 2 samples counted (the truncated shard keeps 3 of its 4), 3 of them bad: 11 batches of 3.
    assert summary["rows"] == 33 and result.global_step == 11 and len(reasons) == 3


def test_streaming_refuses_bucketing_and_a_checkpoint_of_another_process_count(sd15, shard_dir, tmp_path):
    with pytest.raises(ValueError, match="--bucketing needs every image size"):
        train(parse_train_args(_args(sd15, shard_dir, tmp_path / "b", "--bucketing", "--max-train-steps", "1")))
    out = tmp_path / "c"
    args = _args(sd15, shard_dir, out, "--max-train-steps", "2", "--checkpointing-steps", "1")
    train(parse_train_args([*args, "--exit-after-steps", "1"]))
    # As if written by a 2-process run: this single process finds no position of its own.
    ckpt = out / "checkpoints" / "checkpoint-1"
    (ckpt / "data_state.rank0.json").rename(ckpt / "data_state.rank1.json")
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    manifest["files"]["data_state.rank1.json"] = manifest["files"].pop("data_state.rank0.json")
    from controlnext.training import checkpoint as ck

    manifest[ck._SELF_HASH] = ck._manifest_hash(manifest)
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no streaming data position for process 0.*written by 1 process"):
        train(parse_train_args([*args, "--resume-from-checkpoint", "latest"]))


# ------------------------------------------------------------------------------------------------ caches
@pytest.fixture(scope="module")
def cache_dir(sd15, shapes, tmp_path_factory):
    from controlnext.cli import main

    out = tmp_path_factory.mktemp("cache") / "cache"
    assert main(["make-shards", str(shapes), str(out), "--samples-per-shard", "7", "--cache-latents", "--base",
                 str(sd15), "--resolution", "64", "--cpu"]) == 0  # fmt: skip
    return out


def test_streaming_cache_trains_like_the_images_it_was_made_from(sd15, shard_dir, cache_dir, tmp_path):
    record = json.loads((cache_dir / sh.INDEX_FILE).read_text())["cache"]
    assert record["family"] == "sd15" and record["resolution"] == 64 and record["vae"]["dtype"] == "float32"
    with __import__("tarfile").open(cache_dir / "shard-000000.tar") as tar:
        assert sorted(n.split(".", 1)[1] for n in tar.getnames()[:3]) == [
            "cache.safetensors", "conditioning_image.png", "json"]  # fmt: skip
    common = ["--center-crop", "--caption-dropout", "0.3", "--max-train-steps", "4", "--dataloader-num-workers", "2"]
    images = train(parse_train_args(_args(sd15, shard_dir, tmp_path / "images", *common)))
    cached = train(parse_train_args(_args(sd15, cache_dir, tmp_path / "cached", *common)))
    # Same samples in the same order, the same dropped captions: only the VAE's batching differs (float rounding).
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(images.losses), rtol=1e-5, atol=0)


def test_streaming_sdxl_cache_keeps_pooled_embeddings_and_size_conditioning(sdxl, shapes, shard_dir, tmp_path):
    from controlnext.cli import main

    cache = tmp_path / "sdxl-cache"
    assert main(["make-shards", str(shapes), str(cache), "--samples-per-shard", "7", "--cache-latents", "--base",
                 str(sdxl), "--resolution", "64", "--cpu"]) == 0  # fmt: skip
    common = ["--center-crop", "--caption-dropout", "0.5", "--max-train-steps", "2"]
    images = train(parse_train_args(_args(sdxl, shard_dir, tmp_path / "images", *common)))
    cached = train(parse_train_args(_args(sdxl, cache, tmp_path / "cached", *common)))
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(images.losses), rtol=1e-5, atol=0)


def test_streaming_cache_of_another_encoder_resolution_or_dtype_is_refused(sd15, cache_dir, tmp_path):
    from controlnext.training.base import load_base_model
    from controlnext.training.cache import check_cache

    record = json.loads((cache_dir / sh.INDEX_FILE).read_text())["cache"]
    base = load_base_model(str(sd15))
    check_cache(record, base, 64, "cache")  # the encoders it was made with
    with torch.no_grad():
        next(base.vae.parameters()).add_(1e-3)  # another VAE (e.g. a fine-tuned one)
    with pytest.raises(ValueError, match=r"VAE is another model \(SHA-256"):
        check_cache(record, base, 64, "cache")
    base = load_base_model(str(sd15))
    base.text_encoders[0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="text encoder 1 dtype float32 -> bfloat16"):
        check_cache(record, base, 64, "cache")
    # Through `controlnext train`, before any step: another resolution, another dtype, random flips.
    for extra, message in (
        (["--resolution", "32"], r"resolution 64 -> 32"),
        (["--mixed-precision", "bf16"], r"VAE dtype float32 -> bfloat16"),
        (["--random-flip"], "--random-flip cannot be used with the latent cache"),
    ):
        args = _args(sd15, cache_dir, tmp_path / "refused", "--max-train-steps", "1")
        args[args.index("--resolution") : args.index("--resolution") + 2] = []
        with pytest.raises(ValueError, match=message):
            train(parse_train_args([*args, "--resolution", "64", *extra]))


def test_streaming_two_processes_each_read_their_own_shards(sd15, shard_dir, tmp_path):
    from test_train_distributed import _launch

    out = tmp_path / "ddp"
    args = _args(sd15, shard_dir, out, "--num-train-epochs", "2", "--checkpointing-steps", "4", "--random-flip",
                 "--dataloader-num-workers", "2")  # fmt: skip
    proc = _launch(args)
    assert "32 samples in 5 shards, streamed" in proc.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    # 32 samples / (2 processes x 3): 6 batches per process per epoch, the last ones smaller; both end equal.
    assert summary["steps"] == 12 and len(set(summary["rank_fingerprints"])) == 1
    states = [json.loads((out / "checkpoints" / "checkpoint-8" / f"data_state.rank{r}.json").read_text())
              for r in (0, 1)]  # fmt: skip
    assert [(s["rank"], s["processes"], s["epoch"], s["batches"]) for s in states] == [(0, 2, 1, 2), (1, 2, 1, 2)]
