"""Tiny, randomly initialised models with the real diffusers layouts, for tests, the CI benchmark and offline demos.

They exercise exactly the code paths real checkpoints use (same classes, same folder layout), only small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models.controlnext import ControlNeXtModel

TINY_CONTROLNEXT = dict(
    embedding_channels=(8, 8, 16),
    block_in_channels=(16, 16),
    block_out_channels=(16, 32),
    groups=(4, 8),
    mid_groups=8,
)
TINY_CONTROLNEXT_SD15 = dict(block_in_channels=(3, 16, 32), block_out_channels=(16, 32, 32), groups=(1, 8, 8))
TINY_CONTROLNEXT_SVD = dict(
    embedding_channels=(8, 8, 16), block_in_channels=(16, 16, 32), block_out_channels=(16, 32, 32), groups=(4, 8, 8)
)
# The transformer layout has one residual block (its stem reaches 1/4 through a max-pool).
TINY_CONTROLNEXT_DIT = dict(
    embedding_channels=(8, 8, 16), block_in_channels=(16,), block_out_channels=(32,), groups=(4,), mid_groups=8
)


def tiny_sizes(variant: str) -> dict[str, Any]:
    """Small channel counts with ``variant``'s structure (its number of residual blocks), as config overrides."""
    from ..models.variants import DIT_VARIANTS

    if variant in DIT_VARIANTS:
        return dict(TINY_CONTROLNEXT_DIT)
    return dict({"sd15": TINY_CONTROLNEXT_SD15, "svd": TINY_CONTROLNEXT_SVD}.get(variant, TINY_CONTROLNEXT))


def tiny_controlnext(variant: str, out_channels: int = 32, seed: int = 0, **overrides) -> ControlNeXtModel:
    """A small module with ``variant``'s structure and application rules (not its published channel counts);
    ``overrides`` change config fields (e.g. ``use_timestep=False``)."""
    torch.manual_seed(seed)
    return ControlNeXtModel.from_variant(variant, out_channels=out_channels, **{**tiny_sizes(variant), **overrides})


def tiny_unet(family: str = "sd15", seed: int = 0):
    """A tiny UNet of the given family ('sd15', 'sdxl' or 'svd'); hidden channels 32 then 64, latent 8x8."""
    from diffusers import UNet2DConditionModel, UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    if family == "svd":
        return UNetSpatioTemporalConditionModel(
            sample_size=8,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            layers_per_block=1,
            cross_attention_dim=32,
            num_attention_heads=(2, 4),
            num_frames=4,
        )
    kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if family == "sdxl":
        kwargs.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        )
    elif family != "sd15":
        raise ValueError(f"family must be 'sd15', 'sdxl' or 'svd', got {family!r}")
    return UNet2DConditionModel(**kwargs)


def tiny_vae(seed: int = 0, **config: Any):
    """A tiny AutoencoderKL with the standard 8x spatial factor (four blocks); ``config`` overrides fields."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        **{
            **dict(
                block_out_channels=(8, 8, 16, 16),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                norm_num_groups=4,
                layers_per_block=1,
                sample_size=64,
            ),
            **config,
        }
    )


# Tiny transformer widths: 2 heads x 16 = 32 channels (the tiny control modules' default output), T5 width 48.
TINY_DIT_WIDTH = 32
TINY_T5_WIDTH = 48


def tiny_transformer(family: str = "sd3", seed: int = 0, num_layers: int = 6):
    """A tiny SD3 (``'sd3'``) or Flux (``'flux'``, guidance-distilled like Flux-dev) transformer, inner width 32.

    It takes 16-channel latents as the published VAEs make them (Flux packs them 2x2 into 64), text states of the
    tiny T5 (width 48) and pooled CLIP projections (SD3: both CLIP encoders, 64; Flux: one, 32). ``num_layers``
    joint (SD3) or double-stream (Flux, plus one single-stream block) blocks: the default 6 holds the default
    injection point.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    heads, head_dim = 2, TINY_DIT_WIDTH // 2
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=TINY_T5_WIDTH,
            caption_projection_dim=TINY_DIT_WIDTH,
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=num_layers,
            num_single_layers=1,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=TINY_T5_WIDTH,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")


def write_tiny_t5_tokenizer(path: str | Path, words: list[str] | None = None):
    """Write a Unigram ``T5TokenizerFast`` (pad 0, eos 1, unk 2, the word boundary, then ``words`` as whole pieces)
    to ``path`` and load it back from there; returns the tokenizer."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = words or ["a", "red", "green", "blue", "circle", "square", "triangle", "photo", "of"]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]  # unknown words fall back to letters
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(str(path))
    return T5TokenizerFast.from_pretrained(str(path))


def tiny_t5(path: str | Path, seed: int = 0):
    """A tiny T5 encoder (width 48, 2 layers) and its tokenizer saved at ``path``; returns (encoder, tokenizer)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = write_tiny_t5_tokenizer(path)
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval(), tokenizer


def tiny_dit_pipeline_components(family: str, workdir: str | Path, seed: int = 0, num_layers: int = 6) -> dict:
    """Components of a tiny SD3 (``'sd3'``: two CLIP encoders and T5) or Flux (``'flux'``: CLIP and T5) pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    workdir = Path(workdir)
    # 16 latent channels, shifted and scaled (the published VAE settings of SD3).
    vae = tiny_vae(
        seed, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    t5, t5_tokenizer = tiny_t5(workdir / "t5_tokenizer_src", seed=seed + 2)
    comps: dict[str, Any] = dict(
        transformer=tiny_transformer(family, seed, num_layers), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    if family == "sd3":
        te, tok = tiny_clip(workdir / "tokenizer_src", projection=True, seed=seed)
        te2, tok2 = tiny_clip(workdir / "tokenizer_2_src", projection=True, seed=seed + 1)
        comps.update(text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)
        comps.update(text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    elif family == "flux":
        te, tok = tiny_clip(workdir / "tokenizer_src", seed=seed)
        comps.update(text_encoder=te, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    else:
        raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
    return comps


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_clip_tokenizer(path: str | Path, words: list[str] | None = None) -> Path:
    """Write a byte-level CLIP tokenizer (vocab.json, merges.txt) that knows ``words`` as single tokens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in words or []:
        # Merge left to right: ((w o) r) d</w>, so each listed word becomes one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("\n".join(["#version: 0.2", *dict.fromkeys(merges)]) + "\n")
    return path


def tiny_clip(path: str | Path, projection: bool = False, seed: int = 0, words: list[str] | None = None):
    """A tiny CLIP text encoder (hidden 32) and its tokenizer saved at ``path``; returns (encoder, tokenizer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_tiny_clip_tokenizer(Path(path), words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return encoder, tokenizer


def tiny_pipeline_components(family: str, workdir: str | Path, seed: int = 0) -> dict:
    """Components for a tiny SD1.5 (``family='sd15'``) or SDXL (``'sdxl'``) pipeline."""
    from diffusers import DDIMScheduler

    workdir = Path(workdir)
    text_encoder, tokenizer = tiny_clip(workdir / "tokenizer_src", seed=seed)
    comps = dict(
        unet=tiny_unet(family, seed),
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    )
    if family == "sdxl":
        te2, tok2 = tiny_clip(workdir / "tokenizer_2_src", projection=True, seed=seed + 1)
        comps.update(text_encoder_2=te2, tokenizer_2=tok2)
    else:
        comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return comps


def tiny_svd_components(seed: int = 0) -> dict[str, Any]:
    """Components of a tiny, randomly initialised SVD pipeline (stock classes, real layouts) for tests and demos.

    64x64 pixels -> 8x8 latents (VAE factor 8), the tiny spatio-temporal UNet of :func:`tiny_unet`,
    a 2-layer CLIP vision encoder at 224 px, and the SVD release's Euler scheduler settings.
    """
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4
    )
    torch.manual_seed(seed + 1)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            intermediate_size=37,
            patch_size=32,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return dict(
        vae=vae,
        image_encoder=encoder.eval(),
        unet=tiny_unet("svd", seed),
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
