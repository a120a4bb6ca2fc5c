"""train-video on the shared core: its checkpoints hold the trained tensors only, and checkpoints of the earlier
video loop (the whole model in accelerate's file, the step and losses in the manifest) still resume exactly."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from safetensors.torch import save_file

from controlnext.testing import tiny_svd_components
from controlnext.testing.video import make_synthetic_video_dataset
from controlnext.training import checkpoint as ckpt
from controlnext.training.video import VideoTrainConfig, train_video


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_ckpt")
    StableVideoDiffusionPipeline(**tiny_svd_components()).save_pretrained(root / "base")
    return root / "base", make_synthetic_video_dataset(root / "data", clips=2, frames=8)


def _cfg(setup, out, **kw):
    base, data = setup
    return VideoTrainConfig(
        pretrained_model=str(base), dataset=str(data), output_dir=str(out), width=64, height=64, num_frames=4,
        sample_stride=1, controlnext_config="tiny", learning_rate=1e-3, unet_learning_rate=1e-3, probe_loss=False,
        train_unet=["to_out"], max_train_steps=4, checkpointing_steps=2, **kw,
    )  # fmt: skip


def _to_legacy(folder, base):
    """Rewrite a checkpoint as the earlier video loop wrote it (the frozen UNet tensors are the base's)."""
    from safetensors.torch import load_file

    state = json.loads((folder / "train_state.json").read_text())
    unet = StableVideoDiffusionPipeline.from_pretrained(base).unet
    model = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    model.update({k: v for k, v in load_file(folder / "trainable.safetensors").items()})
    (folder / "trainable.safetensors").unlink()
    (folder / "train_state.json").unlink()
    save_file({k: v.contiguous() for k, v in model.items()}, str(folder / "model.safetensors"))
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ckpt.MANIFEST:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": digest}
    losses = [x for _, x in state["losses"]]
    manifest = {"step": state["global_step"], "files": files, "losses": losses, "resume_key": state["resume_key"]}
    manifest[ckpt._SELF_HASH] = ckpt._manifest_hash(manifest)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_checkpoints_hold_the_trained_tensors_and_old_checkpoints_resume(setup, tmp_path):
    straight = train_video(_cfg(setup, tmp_path / "a"))
    folder = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    files = ckpt.verify_checkpoint(folder)["files"]
    assert "trainable.safetensors" in files and "train_state.json" in files and "model.safetensors" not in files

    old = tmp_path / "old" / "checkpoints" / "checkpoint-2"
    shutil.copytree(folder, old)
    _to_legacy(old, setup[0])
    resumed = train_video(_cfg(setup, tmp_path / "old", resume_from_checkpoint="latest"))
    assert resumed.global_step == 4 and resumed.losses == straight.losses
    for (name, a), b in zip(straight.controlnext.state_dict().items(), resumed.controlnext.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
