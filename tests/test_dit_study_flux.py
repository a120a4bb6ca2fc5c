"""The tiny DiT study's Flux layout (scripts/dit_study.py --layout flux): how latents and text reach the base, and
what each control method trains and changes at its start (the comparison's fairness rests on it)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("dit_study", ROOT / "scripts" / "dit_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dit_study"] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["dit_study"]


def _layout(study, name: str) -> None:
    study.ARGS = argparse.Namespace(layout=name, condition="edges", out="unused")


def _text(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 64, generator=g), torch.randn(batch, 64, generator=g)


def test_flux_packing_is_2x2_patches_and_inverts(study):
    _layout(study, "flux")
    x = torch.randn(3, 4, 16, 16)
    packed = study.pack(x)
    # Token (i, j) holds channel c's 2x2 patch at rows 2i..2i+1, columns 2j..2j+1, channel-major.
    expected = x.reshape(3, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 64, 16)
    assert torch.equal(packed, expected)
    assert torch.equal(study.unpack(packed, x), x)
    _layout(study, "sd3")
    assert study.pack(x) is x and study.unpack(x, x) is x


def test_base_kwargs_per_layout(study):
    states, pooled = _text(2)
    t = torch.tensor([250.0, 1000.0])
    latents = torch.zeros(2, 4, 16, 16)
    _layout(study, "sd3")
    kw = study.base_kwargs(None, latents, t, states, pooled)
    assert sorted(kw) == ["encoder_hidden_states", "pooled_projections", "timestep"] and kw["timestep"] is t
    _layout(study, "flux")
    base = study.make_base()
    kw = study.base_kwargs(base, latents, t, states, pooled)
    assert torch.equal(kw["timestep"], torch.tensor([0.25, 1.0]))  # FluxPipeline's t / 1000
    assert kw["guidance"] is None  # no guidance embedding: guidance is the evaluation's CFG batch
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    assert torch.equal(kw["img_ids"], torch.stack([torch.zeros(64), rows.flatten(), cols.flatten()], 1))
    assert torch.equal(kw["txt_ids"], torch.zeros(16, 3))


def test_flux_base_config(study):
    _layout(study, "flux")
    base = study.make_base()
    assert type(base).__name__ == "FluxTransformer2DModel"
    heads, width = base.config.num_attention_heads, base.config.attention_head_dim
    assert sum(base.config.axes_dims_rope) == width and heads * width == 48
    assert 0.7e6 < sum(p.numel() for p in base.parameters()) < 0.9e6  # comparable with the SD3 base (843k)


@pytest.mark.parametrize("name", ["after_block_0", "controlnet"])
def test_flux_methods_train_their_parameters_and_start_where_expected(study, name):
    _layout(study, "flux")
    base = study.make_base()
    method = study.Method(name, base, seed=0)
    trained = {id(p) for p in method.params}
    base_trained = sorted(n for n, p in base.named_parameters() if id(p) in trained)
    if name == "controlnet":
        assert base_trained == []  # the transformer stays frozen, as train_controlnet_flux.py
        assert len(method.net.transformer_blocks) == 2 and len(method.net.single_transformer_blocks) == 2
    else:  # the family's default subset: image attention output projections of double blocks 1-4
        expected = [f"transformer_blocks.{k}.attn.to_out.0.{w}" for k in range(1, 5) for w in ("bias", "weight")]
        assert base_trained == expected
    assert all(p.requires_grad for p in method.params)
    assert not any(p.requires_grad for n, p in base.named_parameters() if n not in base_trained)

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noisy = study.pack(latents)
    kw = study.base_kwargs(base, latents, torch.tensor([500.0, 900.0]), *_text(2))
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = base(noisy, return_dict=False, **kw)[0]
        controlled = method.pred(noisy, kw, cond, torch.randn(2, 4, 16, 16))
    assert controlled.shape == alone.shape == (2, 64, 16)
    if name == "controlnet":  # zero-initialised condition embedding and output blocks: the base's prediction
        torch.testing.assert_close(controlled, alone, rtol=0, atol=1e-6)
    else:  # a fresh Cross-Normalised module already adds a control
        assert (controlled - alone).abs().max() > 1e-3
