"""The hooked stock UNet equals a reference forward written out block by block, with the published skip semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from controlnext import attach, attached
from controlnext.testing.models import tiny_controlnext, tiny_unet

CASES = [  # (family, variant, module out channels)
    ("sd15", "sd15-training", 32),
    ("sd15", "sd15", 64),
    ("sdxl", "sdxl", 32),
    ("svd", "svd-v2", 32),
    ("svd", "svd", 64),
]


def unet_inputs(family: str, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if family == "svd":
        x = torch.randn(batch, 4, 8, 8, 8, generator=g)
        kw = dict(encoder_hidden_states=torch.randn(batch, 1, 32, generator=g), added_time_ids=torch.randn(batch, 3))
        return x, kw
    x = torch.randn(batch, 4, 8, 8, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(batch, 5, 64 if family == "sdxl" else 32, generator=g))
    if family == "sdxl":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g), time_ids=torch.randn(batch, 6))
    return x, kw


def condition(family: str, rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 4, 3, 64, 64) if family == "svd" else (rows, 3, 64, 64)
    return torch.rand(*shape, generator=g)


def published_cross_norm(c, h, eps, pool_first):
    """Written out as in the release (independent of controlnext.cross_norm)."""
    c = c.to(h)
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mc, sc = c.mean(dim=(1, 2, 3), keepdim=True), c.std(dim=(1, 2, 3), keepdim=True)
    mh, sh = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
    c = (c - mc) * (sh / (sc + eps)) + mh
    return c if pool_first else F.adaptive_avg_pool2d(c, h.shape[-2:])


def reference_forward(unet, x, t, kw, module, cond, user_scale=1.0):
    """The UNet forward called block by block; control added at the module's published point."""
    video = x.dim() == 5
    captured = {}

    def grab(mod, args, kwargs):
        captured.update({k: v for k, v in kwargs.items() if k not in captured})

    hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in unet.down_blocks]
    with torch.no_grad():
        unet(x, t, **kw)  # only to read temb / text states exactly as this UNet prepares them
    for h in hooks:
        h.remove()
    temb = captured["temb"]
    extra = {k: captured[k] for k in ("encoder_hidden_states", "image_only_indicator") if k in captured}
    cfg = module.config
    with torch.no_grad():
        feats = module(module.normalize_condition(cond), t).sample
        scale = module.effective_scale() * user_scale

        def add(hidden):
            return hidden + published_cross_norm(feats, hidden, cfg.norm_eps, cfg.pool_first) * scale

        sample = x.flatten(0, 1) if video else x
        sample = unet.conv_in(sample)
        skips = (sample,)
        if cfg.injection_point == "before_down_block_0":
            sample = add(sample)
        for i, block in enumerate(unet.down_blocks):
            kwargs = dict(hidden_states=sample, temb=temb)
            if video:
                kwargs["image_only_indicator"] = extra["image_only_indicator"]
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = extra["encoder_hidden_states"]
            sample, res = block(**kwargs)
            skips += res
            if i == 0 and cfg.injection_point == "after_down_block_0":
                sample = add(sample)
        if cfg.injection_point == "before_mid_block":  # the last down block's output: the skips were collected
            sample = add(sample)
        sample = unet.mid_block(sample, temb, **extra)
        if cfg.injection_point == "after_mid_block":
            sample = add(sample)
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            kwargs = dict(hidden_states=sample, temb=temb, res_hidden_states_tuple=res)
            if video:
                kwargs["image_only_indicator"] = extra["image_only_indicator"]
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = extra["encoder_hidden_states"]
            sample = block(**kwargs)
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        return sample.reshape(x.shape[0], x.shape[1], *sample.shape[1:]) if video else sample


@pytest.mark.parametrize("family,variant,channels", CASES)
def test_hooked_unet_equals_reference(family, variant, channels):
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=channels).eval()
    x, kw = unet_inputs(family)
    cond = condition(family, 2)
    t = torch.tensor(300)
    expected = reference_forward(unet, x, t, kw, module, cond, user_scale=0.7)
    with torch.no_grad(), attached(unet, module, cond, 0.7):
        got = unet(x, t, **kw).sample
        base = None
    with torch.no_grad():
        base = unet(x, t, **kw).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the control does something


@pytest.mark.parametrize("family,variant,channels", CASES[:3] + CASES[3:4])
def test_scale_zero_and_detach_are_bitwise_base(family, variant, channels):
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=channels).eval()
    x, kw = unet_inputs(family)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks_before = (len(unet._forward_pre_hooks), len(unet.down_blocks[0]._forward_hooks))
    with torch.no_grad():
        base = unet(x, 10, **kw).sample
        with attached(unet, module, condition(family, 2), 0.0):
            zero = unet(x, 10, **kw).sample
        ad = attach(unet, module, condition(family, 2), 1.0)
        unet(x, 10, **kw)
        ad.detach()
        after = unet(x, 10, **kw).sample
    assert torch.equal(base, zero)
    assert torch.equal(base, after)
    assert (len(unet._forward_pre_hooks), len(unet.down_blocks[0]._forward_hooks)) == hooks_before
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_two_modules_sum_their_controls():
    unet = tiny_unet("sd15").eval()
    a = tiny_controlnext("sd15-training", seed=1).eval()
    b = tiny_controlnext("sd15", out_channels=64, seed=2).eval()
    x, kw = unet_inputs("sd15")
    ca, cb = condition("sd15", 2, 3), condition("sd15", 2, 4)
    with torch.no_grad():
        base = unet(x, 5, **kw).sample
        with attached(unet, a, ca, 0.5):
            only_a = unet(x, 5, **kw).sample
        with attached(unet, [a, b], [ca, cb], [0.5, 0.0]):
            a_and_zero_b = unet(x, 5, **kw).sample
        with attached(unet, [a, b], [ca, cb], [0.5, 1.2]):
            both = unet(x, 5, **kw).sample
        with attached(unet, b, cb, 1.2):
            only_b = unet(x, 5, **kw).sample
    assert torch.equal(only_a, a_and_zero_b)
    assert (both - only_a).abs().max() > 1e-3 and (both - only_b).abs().max() > 1e-3
    assert (both - base).abs().max() > 1e-3


def test_cfg_dedup_equals_duplicated_and_encodes_once():
    unet = tiny_unet("sdxl").eval()
    module = tiny_controlnext("sdxl").eval()
    x, kw = unet_inputs("sdxl", batch=4)  # [uncond x2, cond x2]
    cond = condition("sdxl", 2)
    calls = []
    module.time_embedding.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        with attached(unet, module, cond[[0, 1, 0, 1]]):  # the release: condition duplicated per half
            dup = [unet(x, t, **kw).sample for t in (900, 500)]
        calls.clear()
        with attached(unet, module, cond, guidance=True):
            stem_calls = []
            module.embedding.register_forward_hook(lambda *a: stem_calls.append(1))
            dedup = [unet(x, t, **kw).sample for t in (900, 500)]
    for a, b in zip(dup, dedup):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # the encoder's timestep path ran once per step
    assert len(stem_calls) == 1  # and the timestep-free stem once per generation


def test_uncond_half_gets_no_control_for_svd_v2():
    unet = tiny_unet("svd").eval()
    module = tiny_controlnext("svd-v2").eval()
    x, kw = unet_inputs("svd", batch=2)
    with torch.no_grad():
        base = unet(x, 10, **kw).sample
        with attached(unet, module, condition("svd", 1), guidance=True):
            out = unet(x, 10, **kw).sample
    assert torch.equal(out[0], base[0])  # unconditional half untouched, as the v2 release does
    assert (out[1] - base[1]).abs().max() > 1e-4


def release_svd_v1_forward(unet, x, t, kw, module, cond, guidance):
    """The SVD v1 release, written from its code: the pipeline runs the module on the condition (duplicated for the
    two guidance halves), repeats the raw scale per flattened frame and zeroes it on the unconditional half; the forked
    UNet then adds sigmoid(scale) * 1.3 times the cross-normalised control (eps 1e-5, normalise then pool) to the last
    down block's output, just before the mid block."""
    captured = {}

    def grab(mod, args, kwargs):
        captured.update({k: v for k, v in kwargs.items() if k not in captured})

    hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in unet.down_blocks]
    with torch.no_grad():
        unet(x, t, **kw)
    for h in hooks:
        h.remove()
    temb, extra = captured["temb"], {k: captured[k] for k in ("encoder_hidden_states", "image_only_indicator")}
    with torch.no_grad():
        cond_in = torch.cat([cond] * 2) if guidance else cond
        feats = module(cond_in, t).sample
        raw = module.scale.detach().clone()
        if guidance:
            n = feats.shape[0]
            raw = raw.repeat(n)[:, None, None, None]
            raw[: n // 2] *= 0
        sample = unet.conv_in(x.flatten(0, 1))
        skips = (sample,)
        for block in unet.down_blocks:
            kwargs = dict(hidden_states=sample, temb=temb, image_only_indicator=extra["image_only_indicator"])
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = extra["encoder_hidden_states"]
            sample, res = block(**kwargs)
            skips += res
        mh, sh = sample.mean(dim=(1, 2, 3), keepdim=True), sample.std(dim=(1, 2, 3), keepdim=True)
        mc, sc = feats.mean(dim=(1, 2, 3), keepdim=True), feats.std(dim=(1, 2, 3), keepdim=True)
        control = F.adaptive_avg_pool2d((feats - mc) * (sh / (sc + 1e-5)) + mh, sample.shape[-2:])
        sample = sample + control * torch.sigmoid(raw) * 1.3
        sample = unet.mid_block(sample, temb, **extra)
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            kwargs = dict(hidden_states=sample, temb=temb, res_hidden_states_tuple=res,
                          image_only_indicator=extra["image_only_indicator"])  # fmt: skip
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = extra["encoder_hidden_states"]
            sample = block(**kwargs)
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        return sample.reshape(x.shape[0], x.shape[1], *sample.shape[1:])


@pytest.mark.parametrize("guidance", [False, True])
def test_svd_v1_equals_the_release_unet(guidance):
    unet = tiny_unet("svd").eval()
    module = tiny_controlnext("svd", out_channels=64).eval()
    with torch.no_grad():
        module.scale.fill_(0.8)  # a learned raw scale away from 0, so both halves' rules show
    x, kw = unet_inputs("svd", batch=2)
    cond = condition("svd", 1 if guidance else 2)
    expected = release_svd_v1_forward(unet, x, torch.tensor(40), kw, module, cond, guidance)
    with torch.no_grad(), attached(unet, module, cond, guidance=guidance):
        got = unet(x, torch.tensor(40), **kw).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if guidance:  # the unconditional half gets sigmoid(0) * 1.3 = 0.65 times the control, not 0
        with torch.no_grad():
            base = unet(x, torch.tensor(40), **kw).sample
        assert (got[0] - base[0]).abs().max() > 1e-4


def test_lora_and_attention_processor_compose_with_control():
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig

    unet = tiny_unet("sd15").eval()
    module = tiny_controlnext("sd15-training").eval()
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    unet.set_attn_processor(AttnProcessor())
    x, kw = unet_inputs("sd15")
    cond = condition("sd15", 2)
    expected = reference_forward(unet, x, torch.tensor(20), kw, module, cond)
    with torch.no_grad(), attached(unet, module, cond):
        got = unet(x, torch.tensor(20), **kw).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    unet.disable_adapters()
    with torch.no_grad():
        no_lora = unet(x, 20, **kw).sample
    assert (no_lora - got).abs().max() > 1e-4


def test_gradient_checkpointing_gives_same_gradients():
    module = tiny_controlnext("sd15-training").train()
    unet = tiny_unet("sd15").train()
    x, kw = unet_inputs("sd15")
    cond = condition("sd15", 2)

    def grads(checkpointing: bool):
        module.zero_grad()
        if checkpointing:
            unet.enable_gradient_checkpointing()
            module.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
            module.disable_gradient_checkpointing()
        with attached(unet, module, cond, cache_static=False):
            unet(x, torch.tensor([10, 700]), **kw).sample.square().mean().backward()
        return [p.grad.clone() for p in module.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wrong_family_and_channels_are_refused():
    with pytest.raises(ValueError, match="channels"):
        attach(tiny_unet("sd15"), tiny_controlnext("sdxl", out_channels=320))
    with pytest.raises(ValueError, match="image and video"):
        attach(tiny_unet("svd"), tiny_controlnext("sdxl"))
    with pytest.raises(ValueError, match="one per module"):
        attach(tiny_unet("sd15"), [tiny_controlnext("sd15-training")] * 2, [torch.rand(1, 3, 64, 64)])


def test_condition_batch_must_fit_unet_batch():
    unet = tiny_unet("sd15").eval()
    x, kw = unet_inputs("sd15", batch=2)
    with (
        attached(unet, tiny_controlnext("sd15-training"), condition("sd15", 3)),
        pytest.raises(ValueError, match="batch"),
    ):
        unet(x, 1, **kw)


def test_torch_compile_with_hooks():
    pytest.importorskip("torch._dynamo")
    unet = tiny_unet("sd15").eval()
    module = tiny_controlnext("sd15-training").eval()
    x, kw = unet_inputs("sd15")
    cond = condition("sd15", 2)
    with torch.no_grad(), attached(unet, module, cond):
        eager = unet(x, torch.tensor(30), **kw).sample
        compiled = torch.compile(unet, backend="eager")
        got = compiled(x, torch.tensor(30), **kw).sample
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
