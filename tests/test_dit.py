"""ControlNeXt on transformer bases (SD3, Flux): the token encoder, Cross Normalization over tokens, injection into
the stock transformers (against forwards written out block by block here), the pipelines end to end, loading and
bad input. Everything runs on tiny transformers built offline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.models.embeddings import PatchEmbed

from controlnext import ControlNeXtModel, attach, attached, cross_normalize
from controlnext.families import detect_family, get_family
from controlnext.pipelines import (
    FluxControlNeXtImg2ImgPipeline,
    FluxControlNeXtInpaintPipeline,
    FluxControlNeXtPipeline,
    StableDiffusion3ControlNeXtImg2ImgPipeline,
    StableDiffusion3ControlNeXtInpaintPipeline,
    StableDiffusion3ControlNeXtPipeline,
)
from controlnext.testing.models import tiny_controlnext, tiny_dit_pipeline_components, tiny_transformer

FAMILIES = ("sd3", "flux")
EPS = 1e-6  # the transformer variants' norm_eps


# ---------------------------------------------------------------------------------------------- helpers
def inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Keyword arguments of one transformer call as the stock pipelines make them (64x64 pixels: 8x8 latents)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(batch, 7, 48, generator=g)
    if family == "sd3":
        return dict(
            hidden_states=torch.randn(batch, 16, 8, 8, generator=g),
            encoder_hidden_states=enc,
            pooled_projections=torch.randn(batch, 64, generator=g),
            timestep=torch.tensor([700.0] * batch),  # SD3 pipelines pass t in [0, 1000]
        )
    return dict(
        hidden_states=torch.randn(batch, 16, 64, generator=g),  # 4x4 tokens of 2x2-packed 16-channel latents
        encoder_hidden_states=enc,
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([0.7] * batch),  # Flux pipelines pass t / 1000
        guidance=torch.tensor([3.5] * batch),
        txt_ids=torch.zeros(7, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32),
    )


def ref_cross_norm(c: torch.Tensor, h: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cross Normalization of tokens written out in float64: per sample over all tokens and channels, unbiased std."""
    c64, h64 = c.double(), h.double()
    mc, sc = c64.mean(dim=(1, 2), keepdim=True), c64.std(dim=(1, 2), keepdim=True, unbiased=True)
    mh, sh = h64.mean(dim=(1, 2), keepdim=True), h64.std(dim=(1, 2), keepdim=True, unbiased=True)
    return (c64 - mc) / (sc + eps) * sh + mh


def reference(family, tr, controls, kw, block: int):
    """The stock forward of SD3Transformer2DModel / FluxTransformer2DModel written out block by block, with
    ``controls`` (a list of (tokens, scale)) Cross-Normalised and added to the image tokens block ``block`` returns."""

    def add(h):
        return h + sum(ref_cross_norm(c, h).float() * s for c, s in controls)

    with torch.no_grad():
        if family == "sd3":
            x = kw["hidden_states"]
            h = tr.pos_embed(x)
            temb = tr.time_text_embed(kw["timestep"], kw["pooled_projections"])
            e = tr.context_embedder(kw["encoder_hidden_states"])
            for i, blk in enumerate(tr.transformer_blocks):
                e, h = blk(hidden_states=h, encoder_hidden_states=e, temb=temb)
                h = add(h) if i == block else h
            h = tr.proj_out(tr.norm_out(h, temb))
            p, (hh, ww) = tr.config.patch_size, x.shape[-2:]
            h = h.reshape(x.shape[0], hh // p, ww // p, p, p, -1)
            return torch.einsum("nhwpqc->nchpwq", h).reshape(x.shape[0], -1, hh, ww)
        h = tr.x_embedder(kw["hidden_states"])
        temb = tr.time_text_embed(kw["timestep"] * 1000, kw["guidance"] * 1000, kw["pooled_projections"])
        e = tr.context_embedder(kw["encoder_hidden_states"])
        rot = tr.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
        for i, blk in enumerate(tr.transformer_blocks):
            e, h = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rot)
            h = add(h) if i == block else h
        for blk in tr.single_transformer_blocks:
            e, h = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rot)
        return tr.proj_out(tr.norm_out(h, temb))


def encoder_t(family: str, kw: dict) -> torch.Tensor:
    """The timestep the encoder must see: always the scheduler's t in [0, 1000]."""
    return kw["timestep"] * (1000 if family == "flux" else 1)


def call(tr, kw):
    with torch.no_grad():
        return tr(**kw, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- encoder tokens
def _pre_patch_features(module, cond, t):
    seen = {}
    handle = module.mid_convs[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        tokens = module(cond, t).sample
    handle.remove()
    return seen["x"], tokens


def test_encoder_tokens_follow_sd3_patch_embed_and_flux_packing():
    """The module's tokens are its latent-grid features cut into 2x2 patches in the backbone's own token order."""
    module = tiny_controlnext("flux").eval()
    cond = torch.rand(2, 3, 64, 48)
    grid, tokens = _pre_patch_features(module, cond, 500)
    assert grid.shape[-2:] == (8, 6) and tokens.shape == (2, 4 * 3, 32)  # latent grid 8x6 -> 4x3 tokens
    conv = module.mid_convs[1]
    # Flux: FluxPipeline._pack_latents then a linear layer (what x_embedder sees), with the conv's weights.
    packed = FluxPipeline._pack_latents(grid, 2, grid.shape[1], 8, 6)
    flux = packed @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    torch.testing.assert_close(tokens, flux, rtol=1e-5, atol=1e-5)
    # SD3: diffusers' PatchEmbed (patch 2, no positional embedding) with the same weights.
    embed = PatchEmbed(height=8, width=6, patch_size=2, in_channels=grid.shape[1], embed_dim=32, pos_embed_type=None)
    embed.proj.load_state_dict(conv.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tokens, embed(grid), rtol=1e-5, atol=1e-5)


def test_transformer_variants_name_their_family_and_width():
    for name, width in (("sd3", 1536), ("flux", 3072)):
        with torch.device("meta"):
            m = ControlNeXtModel.from_variant(name)
        assert m.config.family == name and m.config.token_patch == 2 and m.config.out_channels == width
        assert m.config.injection_point == "after_block_0"  # the tiny study's best block (docs/dit.md)
        assert get_family(name).default_variant == name
        # A few million parameters: the light 3.5M layout plus the patchify conv to the transformer's width.
        assert sum(p.numel() for p in m.parameters()) < 7_000_000
    with pytest.raises(ValueError, match="Unknown base-model family"):
        ControlNeXtModel.from_variant("sd3", family="sd4")


# ---------------------------------------------------------------------------------------------- Cross Normalization
@pytest.mark.parametrize("pool_first", [False, True])
def test_cross_normalize_tokens_against_float64(pool_first):
    g = torch.Generator().manual_seed(0)
    control = torch.randn(2, 16, 32, generator=g) * 3 + 1
    hidden = torch.randn(4, 16, 32, generator=g) * 0.5 - 2
    index = torch.tensor([0, 1, 0, 1])
    got = cross_normalize(control, hidden, eps=EPS, pool_first=pool_first, index=index)
    want = ref_cross_norm(control[index], hidden)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.dtype == hidden.dtype
    with pytest.raises(ValueError, match="12 tokens but the transformer's hidden state has 16"):
        cross_normalize(control[:, :12], hidden[:2])
    with pytest.raises(ValueError, match="channels"):
        cross_normalize(control[..., :8], hidden[:2])
    with pytest.raises(ValueError, match="two 3-D"):
        cross_normalize(control, hidden[:2, :, :, None])


# ---------------------------------------------------------------------------------------------- hooked transformer
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("point", ["after_block_4", "after_block_0", "after_block_8"])
def test_hooked_transformer_equals_block_by_block_reference(family, point):
    layers = 9 if point == "after_block_8" else 6
    tr = tiny_transformer(family, num_layers=layers).eval()
    module = ControlNeXtModel.from_variant(family, injection_point=point, **_tiny()).eval()
    kw, cond = inputs(family), torch.rand(2, 3, 64, 64)
    base = call(tr, kw)
    with attached(tr, module, cond, 0.7):
        got = call(tr, kw)
    with torch.no_grad():
        tokens = module(cond, encoder_t(family, kw)).sample
    want = reference(family, tr, [(tokens, 0.7)], kw, int(point.rsplit("_", 1)[1]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert torch.equal(call(tr, kw), base)  # detached: the stock output bit for bit
    with attached(tr, module, cond, 0.0):
        assert torch.equal(call(tr, kw), base)  # scale 0: bit for bit


def test_positional_call_reads_the_timestep_by_name():
    """SD3 takes the timestep fourth: a positional call is controlled exactly like the pipelines' keyword call."""
    tr, module = tiny_transformer("sd3").eval(), tiny_controlnext("sd3").eval()
    kw, cond = inputs("sd3"), torch.rand(2, 3, 64, 64)
    with attached(tr, module, cond), torch.no_grad():
        by_name = tr(**kw, return_dict=False)[0]
        args = [kw[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]
        assert torch.equal(tr(*args, return_dict=False)[0], by_name)


def _tiny(variant: str = "sd3") -> dict:
    from controlnext.testing.models import tiny_sizes

    return dict(tiny_sizes(variant), out_channels=32)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_stream_untouched_and_two_modules_sum(family):
    tr = tiny_transformer(family).eval()
    a, b = tiny_controlnext(family, seed=1).eval(), tiny_controlnext(family, seed=2).eval()
    kw, ca, cb = inputs(family), torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    texts = []
    block = int(a.config.injection_point.rsplit("_", 1)[1])  # the variants' default point
    tr.transformer_blocks[block + 1].register_forward_pre_hook(
        lambda m, args, kwargs: texts.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    base = call(tr, kw)
    with attached(tr, [a, b], [ca, cb], [1.0, 0.5]):
        got = call(tr, kw)
    assert torch.equal(texts[0], texts[1])  # the control never reaches the text tokens
    with torch.no_grad():
        controls = [(a(ca, encoder_t(family, kw)).sample, 1.0), (b(cb, encoder_t(family, kw)).sample, 0.5)]
    torch.testing.assert_close(got, reference(family, tr, controls, kw, block), rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3


def test_sd3_guidance_batch_encodes_once_and_equals_duplicated_computation():
    tr, module = tiny_transformer("sd3").eval(), tiny_controlnext("sd3").eval()
    kw, cond = inputs("sd3", batch=2), torch.rand(1, 3, 64, 64)  # batch [uncond, cond], one condition
    runs = []
    module.time_embedding.register_forward_hook(lambda *a: runs.append(1))
    with attached(tr, module, cond, guidance=True):
        dedup = call(tr, kw)
    assert len(runs) == 1  # one encoder pass for both halves
    with attached(tr, module, cond.repeat(2, 1, 1, 1)):
        duplicated = call(tr, kw)
    torch.testing.assert_close(dedup, duplicated, rtol=1e-5, atol=1e-5)  # float32 rounding of a batch of 1 vs 2


def test_sd3_module_without_unconditional_control_leaves_the_uncond_half_stock():
    tr = tiny_transformer("sd3").eval()
    module = ControlNeXtModel.from_variant("sd3", uncond_control=False, **_tiny()).eval()
    kw, cond = inputs("sd3", batch=2), torch.rand(1, 3, 64, 64)
    base = call(tr, kw)
    with attached(tr, module, cond, guidance=True):
        got = call(tr, kw)
    assert torch.equal(got[:1], base[:1]) and (got[1:] - base[1:]).abs().max() > 1e-3


def test_flux_condition_fitted_to_the_grid_of_its_rotary_ids():
    """With the VAE factor given (as the pipelines do), a Flux condition is resized to the grid its img_ids name."""
    tr, module = tiny_transformer("flux").eval(), tiny_controlnext("flux").eval()
    kw, big = inputs("flux"), torch.rand(2, 3, 128, 128)
    with attached(tr, module, big, pixel_factor=8):
        got = call(tr, kw)
    small = torch.nn.functional.interpolate(big, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    with attached(tr, module, small):
        torch.testing.assert_close(got, call(tr, kw), rtol=1e-6, atol=1e-6)
    with attached(tr, module, big):  # without the factor nothing is resized: a clear error, not a wrong grid
        with pytest.raises(ValueError, match="64 tokens but the transformer's hidden state has 16"):
            call(tr, kw)


def test_gradient_checkpointing_composes():
    tr, module = tiny_transformer("sd3"), tiny_controlnext("sd3")
    kw, cond = inputs("sd3"), torch.rand(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        tr.zero_grad(), module.zero_grad()
        tr.enable_gradient_checkpointing() if checkpointing else tr.disable_gradient_checkpointing()
        with attached(tr, module, cond, cache_static=False):
            tr(**kw, return_dict=False)[0].square().mean().backward()
        grads.append(module.mid_convs[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- wrong modules
def test_wrong_family_or_layout_is_a_clear_error():
    sd3, flux = tiny_transformer("sd3"), tiny_transformer("flux")
    with pytest.raises(ValueError, match=r"made for Flux.1 \(flux\) transformers but this transformer is Stable "):
        attach(sd3, tiny_controlnext("flux"))
    with pytest.raises(ValueError, match="gives feature maps but this sd3 transformer's hidden state"):
        attach(sd3, ControlNeXtModel.from_variant("sdxl", injection_point="after_block_4", **_tiny("sdxl")))
    with pytest.raises(ValueError, match="has no injection point 'before_down_block_0'"):
        attach(flux, tiny_controlnext("sdxl"))
    with pytest.raises(ValueError, match="64 output channels.*has 32 channels"):
        attach(flux, ControlNeXtModel.from_variant("flux", **{**_tiny(), "out_channels": 64}))
    from controlnext.testing.models import tiny_unet

    with pytest.raises(ValueError, match="gives image tokens but this sdxl UNet's hidden state at before_down_block_0"):
        attach(tiny_unet("sdxl"), ControlNeXtModel.from_variant("sdxl", token_patch=2, **_tiny("sdxl")))
    assert not sd3._forward_pre_hooks and not flux._forward_pre_hooks  # nothing left attached after a refusal


# ---------------------------------------------------------------------------------------------- pipelines
PIPES = {
    ("sd3", "txt2img"): StableDiffusion3ControlNeXtPipeline,
    ("sd3", "img2img"): StableDiffusion3ControlNeXtImg2ImgPipeline,
    ("sd3", "inpaint"): StableDiffusion3ControlNeXtInpaintPipeline,
    ("flux", "txt2img"): FluxControlNeXtPipeline,
    ("flux", "img2img"): FluxControlNeXtImg2ImgPipeline,
    ("flux", "inpaint"): FluxControlNeXtInpaintPipeline,
}


TASKS = {"txt2img": "text2img", "img2img": "img2img", "inpaint": "inpaint"}


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {fam: tiny_dit_pipeline_components(fam, root / fam) for fam in FAMILIES}


def make(components, family, task="txt2img", module=None):
    pipe = PIPES[(family, task)](**components[family], controlnext=module or tiny_controlnext(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, task="txt2img", seed=0, **kw):
    extra = {}
    if task != "txt2img":
        extra["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
        extra["strength"] = 0.75
        if detect_family(pipe).name == "flux":  # Flux img2img resizes the init image to height x width (1024)
            extra.update(height=64, width=64)
    if task == "inpaint":
        extra["mask_image"] = torch.ones(1, 1, 64, 64)
    kw.setdefault("control_image", torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5)))
    return pipe(
        "a red circle",
        num_inference_steps=kw.pop("steps", 2),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        max_sequence_length=16,
        **extra,
        **kw,
    ).images


def test_families_list_their_pipelines_and_detect_them(components, tmp_path):
    for family in FAMILIES:
        fam = get_family(family)
        assert all(fam.pipeline_class(TASKS[t]) is PIPES[(family, t)] for t in TASKS)
        pipe = make(components, family)
        assert detect_family(pipe) is fam and detect_family(pipe.transformer) is fam
        assert pipe.backbone is pipe.transformer
        pipe.transformer.save_pretrained(tmp_path / family / "transformer")
        assert detect_family(tmp_path / family) is fam
    assert get_family("sd3").stock_pipeline_class() is StableDiffusion3Pipeline


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
def test_pipeline_runs_and_scale_zero_is_the_stock_pipeline(components, family, task):
    pipe = make(components, family, task)
    on = run(pipe, task)
    off = run(pipe, task, controlnext_conditioning_scale=0.0)
    stock = get_family(family).stock_pipeline_class(TASKS[task])(**components[family])
    stock.set_progress_bar_config(disable=True)
    extra = {"image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)), "strength": 0.75}
    if family == "flux":
        extra.update(height=64, width=64)
    if task == "inpaint":
        extra["mask_image"] = torch.ones(1, 1, 64, 64)
    stock_out = stock(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
        max_sequence_length=16, **(extra if task != "txt2img" else {"height": 64, "width": 64}),
    ).images  # fmt: skip
    assert on.shape == (1, 64, 64, 3) and np.isfinite(on).all()
    assert np.array_equal(off, stock_out) and np.abs(on - off).max() > 1e-4


def _count_encoder_runs(pipe):
    module = pipe.controlnext_modules[0]
    runs, stems = [], []
    module.time_embedding.register_forward_hook(lambda *a: runs.append(1))
    module.embedding.register_forward_hook(lambda *a: stems.append(1))
    return runs, stems


def test_sd3_pipeline_guidance_encodes_the_condition_once_per_step(components):
    pipe = make(components, "sd3")
    runs, stems = _count_encoder_runs(pipe)
    run(pipe, steps=3, guidance_scale=5.0, num_images_per_prompt=2)
    assert len(runs) == 3 and len(stems) == 1


def test_flux_distilled_and_true_cfg_paths(components):
    pipe = make(components, "flux")
    runs, stems = _count_encoder_runs(pipe)
    distilled = run(pipe, steps=2, guidance_scale=3.5)
    assert len(runs) == 2 and len(stems) == 1  # one transformer call per step
    runs.clear()
    true_cfg = run(pipe, steps=2, negative_prompt="a blue square", true_cfg_scale=2.0)
    assert len(runs) == 4  # true CFG: two transformer calls per step, each controlled
    no_control = run(pipe, steps=2, negative_prompt="a blue square", true_cfg_scale=2.0,
                     controlnext_conditioning_scale=0.0)  # fmt: skip
    assert np.abs(true_cfg - distilled).max() > 1e-4 and np.abs(true_cfg - no_control).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_window(components, family):
    pipe = make(components, family)
    runs, _ = _count_encoder_runs(pipe)
    full = run(pipe, steps=4)
    assert len(runs) == 4
    runs.clear()
    window = run(pipe, steps=4, control_guidance_start=0.0, control_guidance_end=0.5)
    assert len(runs) == 2  # the control is off for the second half of the schedule
    off = run(pipe, steps=4, controlnext_conditioning_scale=0.0)
    assert np.abs(full - window).max() > 1e-4 and np.abs(window - off).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_modules_and_save_load_round_trip(components, family, tmp_path):
    pipe = make(components, family, module=[tiny_controlnext(family, seed=1), tiny_controlnext(family, seed=2)])
    cond = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    both = run(pipe, control_image=cond)
    only_a = run(pipe, control_image=cond, controlnext_conditioning_scale=[1.0, 0.0])
    assert np.abs(both - only_a).max() > 1e-4
    pipe.save_pretrained(tmp_path / "pipe")
    again = PIPES[(family, "txt2img")].from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert [m.config.family for m in again.controlnext_modules] == [family, family]
    assert np.array_equal(both, run(again, control_image=cond))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_plus_control(components, family):
    from peft import LoraConfig

    comps = dict(components[family], transformer=tiny_transformer(family))
    pipe = PIPES[(family, "txt2img")](**comps, controlnext=tiny_controlnext(family))
    pipe.set_progress_bar_config(disable=True)
    control_only = run(pipe)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(lora)
    both = run(pipe)
    lora_only = run(pipe, controlnext_conditioning_scale=0.0)
    assert np.abs(both - control_only).max() > 1e-4 and np.abs(both - lora_only).max() > 1e-4
    pipe.transformer.disable_adapters()
    assert np.array_equal(run(pipe), control_only)


# ---------------------------------------------------------------------------------------------- loading and bad input
def test_flux_module_on_sd3_pipeline_is_a_clear_error(components, tmp_path):
    with pytest.raises(ValueError, match=r"made for Flux.1 \(flux\) transformers but this transformer is Stable"):
        run(make(components, "sd3", module=tiny_controlnext("flux")))
    tiny_controlnext("flux").save_pretrained(tmp_path / "flux_module")
    pipe = make(components, "sd3")
    with pytest.raises(ValueError, match=r"'flux' module \(for flux transformers\) but the transformer is sd3"):
        pipe.load_controlnext(tmp_path / "flux_module")
    tiny_controlnext("sd3", seed=3).save_pretrained(tmp_path / "sd3_module")
    pipe.load_controlnext(tmp_path / "sd3_module")
    assert len(pipe.controlnext_modules) == 2 and run(pipe, control_image=[torch.rand(3, 64, 64)] * 2).shape[0] == 1


def test_single_file_names_its_family(tmp_path):
    from controlnext.loading import load_controlnext_file, save_controlnext_file

    module = tiny_controlnext("flux", seed=4)
    path = save_controlnext_file(module, tmp_path / "flux.safetensors")
    again = load_controlnext_file(path, family="flux")
    assert again.config.family == "flux" and again.config.token_patch == 2
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match=r"'flux' module \(for flux transformers\) but the transformer is sd3"):
        load_controlnext_file(path, family="sd3")


def test_state_dict_without_metadata_is_matched_to_its_transformer_layout(tmp_path):
    from safetensors.torch import save_file

    from controlnext.loading import load_controlnext_file

    with torch.device("meta"):
        layout = ControlNeXtModel.from_variant("sd3").state_dict()
    state = {k: torch.full(v.shape, 0.01) for k, v in layout.items()}  # another tool's export: no config metadata
    save_file(state, str(tmp_path / "sd3.safetensors"))
    for variant in (None, "sd3"):
        module = load_controlnext_file(tmp_path / "sd3.safetensors", variant=variant, family="sd3")
        assert module.config.variant == "sd3" and module.config.family == "sd3"
    with pytest.raises(ValueError, match="does not have the layout of variant 'flux'"):
        load_controlnext_file(tmp_path / "sd3.safetensors", variant="flux")


def test_generate_command_picks_the_transformer_pipeline(components, tmp_path):
    from controlnext.commands.generate import load_pipeline

    for family, stock in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        stock(**components[family]).save_pretrained(tmp_path / family)
        tiny_controlnext(family).save_pretrained(tmp_path / f"{family}_module")
        pipe = load_pipeline(str(tmp_path / family), "cpu", torch.float32, str(tmp_path / f"{family}_module"))
        assert type(pipe) is PIPES[(family, "txt2img")] and pipe.controlnext_modules[0].config.family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_other_aspect_ratio_is_stretched_with_a_warning(components, family, caplog):
    pipe = make(components, family)
    with caplog.at_level(logging.WARNING, logger="controlnext.inject"):
        out = run(pipe, control_image=torch.rand(3, 64, 128), height=64, width=64)
    assert out.shape == (1, 64, 64, 3) and "stretched" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_output_size_from_the_condition_rounds_to_whole_patches(components, family):
    """A 72x88 condition sets a 64x80 output: the VAE factor (8) times the transformer's patch (2) must divide it,
    so the size is rounded down to multiples of 16 (SD3's pipeline would refuse 72, Flux's would warn)."""
    pipe = make(components, family)
    out = run(pipe, control_image=torch.rand(3, 72, 88))
    assert out.shape == (1, 64, 80, 3)


def test_training_offers_the_transformer_families():
    # Training itself is tested in test_dit_training.py.
    from controlnext.training.config import parse_train_args

    for family in FAMILIES:
        cfg = parse_train_args(["--pretrained-model", "base", "--dataset", "data", "--family", family])
        assert cfg.family == family


def test_sd3_skip_layer_guidance_with_control_is_refused(components):
    pipe = make(components, "sd3")
    with pytest.raises(ValueError, match="skip_guidance_layers .* is not supported with ControlNeXt control"):
        run(pipe, guidance_scale=5.0, skip_guidance_layers=[1])
    pipe.set_controlnext(None)  # without a module the stock option works as before
    out = run(pipe, control_image=None, height=64, width=64, guidance_scale=5.0, skip_guidance_layers=[1])
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_cpu_offload_hooks_compose(components, family):
    # On CPU the offload "device" is the CPU itself, but accelerate's hooks are installed on every component, so
    # this checks that the transformer hooks and the excluded control module work inside that hook chain.
    comps = dict(components[family], transformer=tiny_transformer(family))  # offload hooks stay off the shared one
    pipe = PIPES[(family, "txt2img")](**comps, controlnext=tiny_controlnext(family))
    pipe.set_progress_bar_config(disable=True)
    before = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and not hasattr(pipe.controlnext, "_hf_hook")
    assert np.array_equal(run(pipe), before)
    pipe.remove_all_hooks()


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_attention_processors_compose(family):
    """Control hooks sit on blocks, attention processors inside them: a replaced processor runs under control."""
    tr, module = tiny_transformer(family).eval(), tiny_controlnext(family).eval()
    kw, cond = inputs(family), torch.rand(2, 3, 64, 64)
    with attached(tr, module, cond):
        want = call(tr, kw)
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    tr.set_attn_processor({name: Counting(p) for name, p in tr.attn_processors.items()})
    with attached(tr, module, cond):
        got = call(tr, kw)
    assert len(calls) == len(tr.attn_processors) and torch.equal(got, want)
