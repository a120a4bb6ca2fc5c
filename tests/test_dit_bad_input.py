"""Bad input to the SD3 and Flux ControlNeXt pipelines (what tests/test_dit.py does not cover already): sizes the
patching cannot take, each a clear error or the stock pipeline's documented rounding with the control fitted to it."""

from __future__ import annotations

import logging

import pytest
import torch

from controlnext.pipelines import FluxControlNeXtPipeline, StableDiffusion3ControlNeXtPipeline
from controlnext.testing.models import tiny_controlnext, tiny_dit_pipeline_components

PIPES = {"sd3": StableDiffusion3ControlNeXtPipeline, "flux": FluxControlNeXtPipeline}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_bad")
    out = {}
    for family, cls in PIPES.items():
        pipe = cls(**tiny_dit_pipeline_components(family, root / family), controlnext=tiny_controlnext(family))
        pipe.set_progress_bar_config(disable=True)
        out[family] = pipe
    return out


def _run(pipe, height: int, width: int, cond: torch.Tensor | None = None):
    cond = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) if cond is None else cond
    return pipe(
        "a red circle", control_image=cond, height=height, width=width, num_inference_steps=1, output_type="np",
        max_sequence_length=16, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


@pytest.mark.parametrize("height, width", [(72, 64), (64, 56)])
def test_sd3_refuses_sizes_that_are_not_whole_patches(pipes, height, width):
    """VAE factor 8 x patch 2: SD3's pipeline (and so ours) refuses other sizes, naming the multiple."""
    with pytest.raises(ValueError, match=f"divisible by 16 but are {height} and {width}"):
        _run(pipes["sd3"], height, width)


def test_flux_rounds_sizes_down_to_whole_patches_and_fits_the_control(pipes, caplog):
    """FluxPipeline's documented conversion: the size is rounded down to multiples of 16 (with its warning), and the
    condition is fitted to the rounded size (stretched, with our warning, when its aspect ratio no longer matches)."""
    pipe = pipes["flux"]
    with caplog.at_level(logging.WARNING, logger="controlnext.inject"):
        out = _run(pipe, 64, 56)
    assert out.shape == (1, 64, 48, 3)
    assert "stretched to the output's 48x64" in caplog.text
    # The control still acts: the same request with scale 0 gives another picture.
    off = pipe("a red circle", control_image=torch.rand(3, 64, 56, generator=torch.Generator().manual_seed(0)),
               height=64, width=56, num_inference_steps=1, output_type="np", max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), controlnext_conditioning_scale=0.0).images  # fmt: skip
    assert abs(out - off).max() > 1e-4


@pytest.mark.parametrize("family, message", [("sd3", "divisible by 16"), ("flux", "at least one patch")])
def test_a_side_below_one_patch_is_a_clear_error(pipes, family, message):
    """8 px rounds to no token at all: a clear ValueError, not an error from inside torch."""
    with pytest.raises(ValueError, match=message):
        _run(pipes[family], 64, 8)
