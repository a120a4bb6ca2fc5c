"""Shared fixtures: tiny models written to temp folders (no downloads)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
# Tiny models run fastest on one thread (and CI machines are small and shared).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny SD1.5-layout base model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import StableDiffusionPipeline

    from controlnext.testing.models import tiny_pipeline_components

    root = tmp_path_factory.mktemp("tiny_sd15")
    pipe = StableDiffusionPipeline(**tiny_pipeline_components("sd15", root / "src"))
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from controlnext.testing.models import tiny_pipeline_components

    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = StableDiffusionXLPipeline(**tiny_pipeline_components("sdxl", root / "src"))
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    """A tiny SD1.5 base model folder as the training tests use it."""
    from controlnext.testing.data import write_tiny_base

    path = tmp_path_factory.mktemp("train-tiny-sd15")
    write_tiny_base(path, "sd15")
    return path


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    from controlnext.testing.data import write_tiny_base

    path = tmp_path_factory.mktemp("train-tiny-sdxl")
    write_tiny_base(path, "sdxl")
    return path


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A 32-row synthetic (image, condition, caption) dataset."""
    from controlnext.testing.data import write_shapes_dataset

    path = tmp_path_factory.mktemp("train-shapes-32")
    write_shapes_dataset(path, n=32)
    return path
