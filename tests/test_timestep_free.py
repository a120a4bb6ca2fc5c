"""The timestep-free ControlNeXt option: an encoder without timestep input, computed once per generation."""

from __future__ import annotations

import pytest
import torch

from controlnext import ControlNeXtModel, attached
from controlnext.testing.models import tiny_controlnext, tiny_unet
from test_injection import condition, reference_forward, unet_inputs


def stock_encoder(module: ControlNeXtModel, cond: torch.Tensor) -> torch.Tensor:
    """The encoder composed from its stock diffusers layers, each block called with ``temb=None``."""
    x = module.embedding(cond) if module.embedding is not None else cond
    for res, down in zip(module.down_res, module.down_sample):
        x = down(res(x, None))
    y = module.mid_convs[0](x)
    x = y + x if module.config.mid_residual else y
    return module.mid_convs[1](x)


@pytest.mark.parametrize("variant", ["sd15-training", "sdxl", "sd15"])
def test_no_timestep_keys_and_output_ignores_the_timestep(variant):
    module = tiny_controlnext(variant, use_timestep=False).eval()
    assert not any(k.startswith("time_") or "time_emb_proj" in k for k in module.state_dict())
    timed = tiny_controlnext(variant)
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in timed.parameters())
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = stock_encoder(module, cond)
        outs = [module(cond, t).sample for t in (0, 500, torch.tensor([999, 10]))]  # in-place inference path
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    module.train()
    grad_out = module(cond, 321).sample  # the autograd path (training)
    torch.testing.assert_close(grad_out, expected, rtol=1e-6, atol=1e-6)
    grad_out.square().mean().backward()
    # Every encoder weight gets a gradient (the learnable scale multiplies the features in the adapter, not here).
    assert all(p.grad is not None for n, p in module.named_parameters() if n != "scale")


def test_attached_equals_reference_and_encodes_once_per_generation():
    unet = tiny_unet("sd15").eval()
    module = tiny_controlnext("sd15-training", use_timestep=False).eval()
    x, kw = unet_inputs("sd15")
    cond = condition("sd15", 2)
    runs = []
    module.mid_convs[1].register_forward_hook(lambda *a: runs.append(1))  # the output conv
    with torch.no_grad(), attached(unet, module, cond, 0.8):
        got = [unet(x, torch.tensor(t), **kw).sample for t in (900, 500, 100)]
    assert len(runs) == 1  # the whole encoder ran once for three denoising steps
    for t, out in zip((900, 500, 100), got):
        torch.testing.assert_close(out, reference_forward(unet, x, torch.tensor(t), kw, module, cond, 0.8),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    # A new condition is encoded afresh, not served from the cache.
    with torch.no_grad(), attached(unet, module, cond.flip(0), 0.8):
        flipped = unet(x, torch.tensor(900), **kw).sample
    assert not torch.equal(flipped, got[0])


def test_save_load_round_trip(tmp_path):
    module = tiny_controlnext("sd15-training", use_timestep=False)
    module.save_pretrained(tmp_path)
    again = ControlNeXtModel.from_pretrained(tmp_path)
    assert again.config.use_timestep is False
    cond = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(cond, 0).sample, module(cond, 0).sample, rtol=0, atol=0)


def test_single_file_round_trip(tmp_path):
    """The config travels in the file's metadata, so a file without `time_*` keys loads as timestep-free."""
    from controlnext.loading import load_controlnext_file, save_controlnext_file

    module = tiny_controlnext("sd15-training", use_timestep=False)
    path = save_controlnext_file(module, tmp_path / "controlnext.safetensors")
    again = load_controlnext_file(path)
    assert again.config.use_timestep is False
    cond = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(cond, 0).sample, module(cond, 0).sample, rtol=0, atol=0)
