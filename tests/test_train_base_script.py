"""`scripts/train_base.py` (the demo base's trainer) runs end to end and writes a loadable Stable Diffusion folder.

A few steps only: the point is that the script's code path (VAE, latents, the DDPM objective on the sampling
scheduler's betas, EMA, the atomic save) still runs with the library it imports.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_base", ROOT / "scripts" / "train_base.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_base"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_train_base_script_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "base"
    argv = [str(out), "--vae-steps", "2", "--vae-batch", "2", "--n-train", "8", "--unet-steps", "3", "--batch", "4",
            "--warmup", "1"]  # fmt: skip
    assert _script().main(argv) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["final"] and info["unet_steps"] == 3 and info["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
