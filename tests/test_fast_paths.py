"""Each inference fast path equals the plain computation it replaces, written out independently here.

* (a) the cached timestep-independent prefix (``encode_static`` + ``forward_static``) vs the published forward, which
  calls the module's diffusers blocks directly, for every published layout (real channel counts, small images);
* (b) classifier-free guidance de-duplication (one encoder pass, statistics mapped onto both halves) vs the release's
  duplicated condition, and the encoder runs once per step;
* (c) several images per prompt (and one condition per prompt) vs conditions repeated per image;
* (d) the cache across steps vs recomputing the encoder at every step;
* (e) the encoder in bf16/fp16 vs fp32, with the published timestep numerics (sinusoid cast to the module's dtype).
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from controlnext import ControlNeXtModel, attach
from controlnext.testing.models import tiny_controlnext, tiny_unet

VARIANTS = ("sd15", "sd15-training", "sdxl", "svd", "svd-v2")
VIDEO = ("svd", "svd-v2")
# (family, variant, module out channels) for the tiny UNets: after-mid variants need the deepest channel count.
UNET_CASES = [
    ("sd15", "sd15-training", 32),
    ("sd15", "sd15", 64),
    ("sdxl", "sdxl", 32),
    ("svd", "svd-v2", 32),
    ("svd", "svd", 64),
]


# ---------------------------------------------------------------------------------------------- plain references
def plain_forward(module: ControlNeXtModel, condition: torch.Tensor, timestep) -> torch.Tensor:
    """The published encoder forward: whole ResnetBlock2D calls, timestep expanded to the batch, no caching."""
    x = condition
    frames = 1
    if x.dim() == 5:
        frames = x.shape[1]
        x = x.flatten(0, 1)
    x = x.to(module.dtype)
    t = torch.as_tensor(timestep).reshape(-1)
    t = t.expand(condition.shape[0]) if t.numel() == 1 else t
    emb = module.time_embedding(module.time_proj(t).to(dtype=x.dtype))
    emb = emb.repeat_interleave(frames, dim=0)
    if module.embedding is not None:
        x = module.embedding(x)
    for res, down in zip(module.down_res, module.down_sample):
        x = down(res(x, emb))
    y = module.mid_convs[0](x)
    x = y + x if module.config.mid_residual else y
    return module.mid_convs[1](x)


def plain_cross_norm(c: torch.Tensor, h: torch.Tensor, eps: float, pool_first: bool) -> torch.Tensor:
    """Cross Normalization as released: per-sample statistics over (C, H, W), unbiased std."""
    c = c.to(h)
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mc, sc = c.mean(dim=(1, 2, 3), keepdim=True), c.std(dim=(1, 2, 3), keepdim=True)
    mh, sh = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
    c = (c - mc) * (sh / (sc + eps)) + mh
    return c if pool_first else F.adaptive_avg_pool2d(c, h.shape[-2:])


@contextmanager
def plain_control(unet, module: ControlNeXtModel, features: torch.Tensor, scale: torch.Tensor):
    """Add ``features`` (one row per UNet sample/frame) at the module's injection point with plain hooks."""
    cfg = module.config

    def add(hidden):
        return hidden + plain_cross_norm(features, hidden, cfg.norm_eps, cfg.pool_first) * scale.to(hidden.dtype)

    if cfg.injection_point == "before_down_block_0":

        def pre(mod, args, kwargs):
            return (), dict(kwargs, hidden_states=add(kwargs["hidden_states"]))

        handle = unet.down_blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    elif cfg.injection_point == "after_down_block_0":
        handle = unet.down_blocks[0].register_forward_hook(lambda mod, args, out: (add(out[0]), out[1]))
    elif cfg.injection_point == "before_mid_block":

        def pre_mid(mod, args, kwargs):
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=add(kwargs["hidden_states"]))
            return (add(args[0]), *args[1:]), kwargs

        handle = unet.mid_block.register_forward_pre_hook(pre_mid, with_kwargs=True)
    else:
        assert cfg.injection_point == "after_mid_block", cfg.injection_point
        handle = unet.mid_block.register_forward_hook(
            lambda mod, args, out: (add(out[0]), *out[1:]) if isinstance(out, tuple) else add(out)
        )
    try:
        yield
    finally:
        handle.remove()


def unet_inputs(unet, family: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    if family == "svd":
        x = torch.randn(batch, 4, 8, 8, 8, generator=g)
        kw = dict(encoder_hidden_states=torch.randn(batch, 1, dim, generator=g), added_time_ids=torch.randn(batch, 3))
        return x, kw
    x = torch.randn(batch, 4, 8, 8, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(batch, 5, dim, generator=g))
    if family == "sdxl":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g), time_ids=torch.randn(batch, 6))
    return x, kw


def pixels(family: str, rows: int, seed: int = 1, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 4, 3, size, size) if family == "svd" else (rows, 3, size, size)
    return torch.rand(*shape, generator=g)


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 rounding, relative to the tensor's magnitude (sums of many terms reorder freely)."""
    scale = expected.abs().max().clamp_min(1e-6).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------- (a) cached prefix
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_prefix_equals_published_forward(variant):
    torch.manual_seed(0)
    module = ControlNeXtModel.from_variant(variant).eval()  # real channel counts; small images keep it fast
    size = 64 if variant == "svd" else 32
    cond = torch.rand(2, 3, 3, size, size) if variant in VIDEO else torch.rand(2, 3, size, size)
    cond = module.normalize_condition(cond)
    static = module.encode_static(cond)
    for t in (torch.tensor(999.5), torch.tensor([10, 700])):  # one shared timestep, then one per row
        close(module.forward_static(static, t).sample, plain_forward(module, cond, t))


@pytest.mark.parametrize("variant", ["sd15", "svd-v2"])
def test_inference_path_leaves_cache_intact_and_matches_autograd_path(variant):
    """Without autograd, block temporaries are reused in place; results stay bit-identical and the cache untouched."""
    module = tiny_controlnext(variant, out_channels=64 if variant == "sd15" else 32).eval()
    cond = torch.rand(2, 2, 3, 64, 64) if variant in VIDEO else torch.rand(2, 3, 64, 64)
    static = module.encode_static(cond)
    kept = (static.hidden.clone(), static.shortcut.clone())
    fast = module.forward_static(static, torch.tensor(300)).sample
    again = module.forward_static(static, torch.tensor(300)).sample
    assert torch.equal(static.hidden, kept[0]) and torch.equal(static.shortcut, kept[1])
    assert torch.equal(fast, again)
    with torch.enable_grad():
        module.requires_grad_(True)
        slow = module.forward_static(module.encode_static(cond), torch.tensor(300)).sample
        slow.sum().backward()  # the autograd path still trains
    assert module.down_res[0].conv1.weight.grad is not None
    assert torch.equal(fast, slow.detach())


def test_cached_prefix_keeps_the_published_residual_numerics():
    """The split first block is the diffusers ResnetBlock2D exactly: same op order, bit for bit on CPU."""
    torch.manual_seed(0)
    module = ControlNeXtModel.from_variant("sdxl").eval()
    cond = torch.rand(1, 3, 32, 32)
    t = torch.tensor([321])
    emb = module.time_embedding(module.time_proj(t).to(module.dtype))
    x = module.embedding(cond)
    block_out = module.down_res[0](x, emb)
    static = module.encode_static(cond)
    block = module.down_res[0]
    h = static.hidden + block.time_emb_proj(block.nonlinearity(emb))[:, :, None, None]
    h = block.conv2(block.nonlinearity(block.norm2(h)))
    assert torch.equal((static.shortcut + h) / block.output_scale_factor, block_out)


# ---------------------------------------------------------------------------------------------- (b) CFG de-duplication
@pytest.mark.parametrize("family,variant,out_ch", UNET_CASES)
def test_guidance_dedup_equals_duplicated_condition(family, variant, out_ch):
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=out_ch).eval()
    cond01 = pixels(family, 1)
    x, kw = unet_inputs(unet, family, batch=2)
    steps = [torch.tensor(900), torch.tensor(500), torch.tensor(100)]
    frames = x.shape[1] if family == "svd" else 1

    # Plain: the release duplicates the condition for both halves and runs the encoder on the doubled batch.
    expected = []
    for t in steps:
        feats = plain_forward(module, module.normalize_condition(cond01).repeat(2, *[1] * (cond01.dim() - 1)), t)
        # The SVD releases zero the raw scale on the unconditional half, then apply the scale rule.
        raw = module.scale.detach().reshape(1, 1, 1, 1).expand(2 * frames, 1, 1, 1).clone()
        if not module.config.uncond_control:
            raw[:frames] = 0.0
        rule = torch.sigmoid(raw) if module.config.scale_rule == "sigmoid" else raw
        scale = rule * module.config.control_level
        with plain_control(unet, module, feats, scale):
            expected.append(unet(x, t, **kw).sample)

    adapter = attach(unet, module, cond01, guidance=True, num_steps=len(steps))
    batches: list[int] = []
    hook = module.mid_convs[1].register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        with mock.patch.object(module, "encode_static", wraps=module.encode_static) as encode:
            for i, t in enumerate(steps):
                adapter.set_step(i)
                close(unet(x, t, **kw).sample, expected[i])
        assert encode.call_count == 1  # the prefix is encoded once per generation
    finally:
        hook.remove()
        adapter.detach()
    # One encoder pass per step, on the single unique condition (times its frames), not on both halves.
    assert batches == [frames] * len(steps)


def test_guidance_flag_off_with_duplicated_batch_matches_dedup():
    """Passing the doubled condition without the guidance flag (the release's way) gives the de-duplicated result."""
    unet = tiny_unet("sdxl").eval()
    module = tiny_controlnext("sdxl").eval()
    cond01 = pixels("sdxl", 1)
    x, kw = unet_inputs(unet, "sdxl", batch=2)
    with_dedup = attach(unet, module, cond01, guidance=True)
    a = unet(x, torch.tensor(400), **kw).sample
    with_dedup.detach()
    plain = attach(unet, module, cond01.repeat(2, 1, 1, 1), cache_static=False)
    b = unet(x, torch.tensor(400), **kw).sample
    plain.detach()
    close(a, b)


# ---------------------------------------------------------------------------------------------- (c) images per prompt
@pytest.mark.parametrize(
    "family,variant,out_ch,rows",
    [(*UNET_CASES[0], 1), (*UNET_CASES[0], 2), (*UNET_CASES[0], 4), (*UNET_CASES[2], 2), (*UNET_CASES[3], 2)],
)
def test_images_per_prompt(family, variant, out_ch, rows):
    """Two prompts x two images each under guidance (UNet batch 8): one condition, one per prompt, or one per image."""
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=out_ch).eval()
    prompts, per_prompt = 2, 2
    half = prompts * per_prompt
    cond01 = pixels(family, rows, seed=3)
    x, kw = unet_inputs(unet, family, batch=2 * half, seed=4)
    t = torch.tensor(250)
    frames = x.shape[1] if family == "svd" else 1

    # Plain: repeat each condition to the images it serves (prompt-major, as diffusers orders the batch), both halves.
    per_half = cond01.repeat_interleave(half // rows, dim=0)
    feats = plain_forward(module, module.normalize_condition(torch.cat([per_half, per_half])), t)
    scale = module.effective_scale().reshape(1, 1, 1, 1).expand(2 * half * frames, 1, 1, 1).clone()
    if not module.config.uncond_control:
        scale[: half * frames] = 0.0
    with plain_control(unet, module, feats, scale):
        expected = unet(x, t, **kw).sample

    adapter = attach(unet, module, cond01, guidance=True)
    batches: list[int] = []
    hook = module.mid_convs[1].register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        close(unet(x, t, **kw).sample, expected)
    finally:
        hook.remove()
        adapter.detach()
    assert batches == [rows * frames]  # encoded once per unique condition


# ---------------------------------------------------------------------------------------------- (d) cache across steps
@pytest.mark.parametrize("family,variant,out_ch", UNET_CASES)
def test_cached_steps_equal_recomputed(family, variant, out_ch):
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=out_ch).eval()
    cond01 = pixels(family, 1)
    x, kw = unet_inputs(unet, family, batch=1)
    steps = [torch.tensor(t) for t in (999, 500, 1)]

    def run(cache: bool) -> list[torch.Tensor]:
        adapter = attach(unet, module, cond01, cache_static=cache, num_steps=len(steps))
        try:
            with mock.patch.object(module, "encode_static", wraps=module.encode_static) as encode:
                outs = []
                for i, t in enumerate(steps):
                    adapter.set_step(i)
                    outs.append(unet(x, t, **kw).sample)
            assert encode.call_count == (1 if cache else len(steps))
        finally:
            adapter.detach()
        return outs

    cached, recomputed = run(True), run(False)
    for a, b in zip(cached, recomputed):
        assert torch.equal(a, b)  # same kernels on the same inputs: bit for bit
    # And both equal the plain per-step computation.
    feats = plain_forward(module, module.normalize_condition(cond01), steps[-1])
    scale = module.effective_scale().reshape(1, 1, 1, 1)
    with plain_control(unet, module, feats, scale):
        close(cached[-1], unet(x, steps[-1], **kw).sample)


def test_steps_reuse_cached_indices():
    """Batch mapping tensors are built once and reused, so steady steps allocate nothing new for them."""
    unet = tiny_unet("sd15").eval()
    module = tiny_controlnext("sd15-training").eval()
    adapter = attach(unet, module, pixels("sd15", 1), guidance=True)
    try:
        index, weight = adapter.row_index(1, 2)
        x, kw = unet_inputs(unet, "sd15", batch=2)
        for step in range(2):
            adapter.set_step(step)
            unet(x, torch.tensor(10), **kw)
            again = adapter.row_index(1, 2)
            assert again[0] is index and again[1] is weight
    finally:
        adapter.detach()


class _HostReads(TorchDispatchMode):
    """Counts ops that read tensor data back to the host (a device synchronisation on a GPU)."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family,variant,out_ch", [UNET_CASES[2], UNET_CASES[3]])
def test_steps_add_no_host_reads(family, variant, out_ch):
    """A steady step with control reads nothing back to the host beyond what the stock UNet itself does."""
    unet = tiny_unet(family).eval()
    module = tiny_controlnext(variant, out_channels=out_ch).eval()
    x, kw = unet_inputs(unet, family, batch=2)
    t = torch.tensor(500)
    with _HostReads() as plain:
        unet(x, t, **kw)
    adapter = attach(unet, module, pixels(family, 1), guidance=True, num_steps=10)
    try:
        unet(x, t, **kw)  # first step: encodes the prefix and builds the batch mapping
        adapter.set_step(1)
        with _HostReads() as controlled:
            unet(x, t, **kw)
    finally:
        adapter.detach()
    assert controlled.count == plain.count


# ---------------------------------------------------------------------------------------------- (e) reduced precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["sd15-training", "sd15", "svd-v2"])
def test_reduced_precision_encoder(variant, dtype):
    ref_module = tiny_controlnext(variant).eval()
    module = tiny_controlnext(variant).eval().to(dtype)
    cond = torch.rand(2, 2, 3, 64, 64) if variant in VIDEO else torch.rand(2, 3, 64, 64)
    cond = module.normalize_condition(cond)
    t = torch.tensor(781)

    out = module.forward_static(module.encode_static(cond), t).sample
    assert out.dtype == dtype
    # Same numerics as the published forward run in that dtype (its timestep sinusoid is cast to the module dtype).
    torch.testing.assert_close(out, plain_forward(module, cond.to(dtype), t), rtol=2e-2, atol=2e-2)
    emb = module.time_embed(t, rows=2)
    assert torch.equal(emb[0], module.time_embedding(module.time_proj(t.reshape(1)).to(dtype))[0])
    # Close to float32: error small relative to the feature magnitude.
    ref = plain_forward(ref_module, cond, t)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < (3e-2 if dtype == torch.bfloat16 else 5e-3), float(err)


def test_reduced_precision_through_adapter():
    """A bf16 UNet with a bf16 module under guidance stays close to the float32 computation."""
    unet, module = tiny_unet("sdxl").eval(), tiny_controlnext("sdxl").eval()
    cond01 = pixels("sdxl", 1)
    x, kw = unet_inputs(unet, "sdxl", batch=2)
    t = torch.tensor(600)
    with_f32 = attach(unet, module, cond01, guidance=True)
    ref = unet(x, t, **kw).sample
    with_f32.detach()

    unet.to(torch.bfloat16)
    module.to(torch.bfloat16)
    kw16 = {
        k: {n: v.bfloat16() for n, v in val.items()} if isinstance(val, dict) else val.bfloat16()
        for k, val in kw.items()
    }
    # The condition in float32: the module casts it once, into the cache.
    adapter = attach(unet, module, cond01, guidance=True)
    try:
        out = unet(x.bfloat16(), t, **kw16).sample
    finally:
        adapter.detach()
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, float(err)
