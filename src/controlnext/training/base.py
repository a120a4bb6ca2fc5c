"""The frozen parts of a Stable Diffusion base model for training: loading, text encoding (with a cache), latents.

A base model is a diffusers folder or hub id with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (plus
``text_encoder_2/ tokenizer_2/`` for SDXL). Only the UNet is (partly) trained; everything here is frozen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..families import detect_family, get_family
from ..sources import require_model_source

__all__ = ["BaseModel", "PromptEncoder", "load_base_model"]


@dataclass
class BaseModel:
    """Components of a base model. ``family`` is the name of its :class:`controlnext.families.Family`."""

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object
    source: str
    extra: dict = field(default_factory=dict)


def _hub_kwargs(revision: str | None, variant: str | None) -> dict:
    kw: dict = {}
    if revision:
        kw["revision"] = revision
    if variant:
        kw["variant"] = variant
    return kw


def load_base_model(
    path_or_id: str,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
) -> BaseModel:
    """Load the base model's components in float32 on the CPU (the caller moves and casts them).

    UNet families here; a transformer family (SD3, Flux: ``family``, or detected) through
    :func:`controlnext.training.dit.load_transformer_base`, so that every caller has one loader.
    """
    from .dit import is_transformer_base, load_transformer_base

    if is_transformer_base(path_or_id, family):
        return load_transformer_base(path_or_id, family, revision, variant, vae_path)
    local = Path(path_or_id)
    if local.exists() and not local.is_dir():
        raise ValueError(
            f"Base model {path_or_id!r} is a file; give a diffusers folder (unet/, vae/, ...) or a hub id."
        )
    if local.is_dir():
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (local / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Base model folder {local} lacks {', '.join(missing)}/: expected the diffusers layout "
                "(unet/, vae/, text_encoder/, tokenizer/, scheduler/, and text_encoder_2/, tokenizer_2/ for SDXL)."
            )
    else:
        require_model_source(path_or_id, "Base model")
    kw = _hub_kwargs(revision, variant)
    try:
        return _load(path_or_id, family, kw, revision, vae_path)
    except OSError as err:  # missing files, offline hub, unknown id: one clear line
        raise FileNotFoundError(f"Could not load the base model {path_or_id!r}: {str(err).splitlines()[0]}") from err


def _load(path_or_id: str, family: str, kw: dict, revision: str | None, vae_path: str | None) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", **kw)
    detected = detect_family(unet).name
    if family == "auto":
        family = detected
    elif get_family(family).name != detected:
        raise ValueError(f"--family {family} was given but the base model {path_or_id!r} looks like {detected}.")
    if vae_path:
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder="vae" if (Path(vae_path) / "vae").is_dir() else None)
    else:
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **kw)
    tokenizers = [CLIPTokenizer.from_pretrained(path_or_id, subfolder="tokenizer", revision=revision)]
    encoders: list[torch.nn.Module] = [CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", **kw)]
    if get_family(family).text_encoders == 2:
        tokenizers.append(CLIPTokenizer.from_pretrained(path_or_id, subfolder="tokenizer_2", revision=revision))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path_or_id, subfolder="text_encoder_2", **kw))
    scheduler = DDPMScheduler.from_pretrained(path_or_id, subfolder="scheduler", revision=revision)
    for module in (vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(family, unet, vae, encoders, tokenizers, scheduler, str(path_or_id))


class PromptEncoder:
    """Frozen text encoding of captions, with an LRU cache of per-caption embeddings.

    Cached captions are encoded one at a time, so an embedding never depends on which other captions shared its
    batch (keeping resumed runs bit-identical to uninterrupted ones whatever the cache held). ``cache_size=0``
    encodes each batch in one call instead.
    """

    def __init__(self, base: BaseModel, device: torch.device, dtype: torch.dtype, cache_size: int = 1024):
        self.base = base
        self.device = device
        self.dtype = dtype
        self.cache_size = cache_size
        self._penultimate = get_family(base.family).sdxl_text_conditioning
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.base.tokenizers, self.base.text_encoders):
            ids = tokenizer(
                captions,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self._penultimate:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
                pooled = out[0]  # the last encoder's projected pooled output
            else:
                hidden.append(encoder(ids, return_dict=False)[0])
        embeds = torch.cat(hidden, dim=-1).to(self.dtype)
        return embeds, (None if pooled is None else pooled.to(self.dtype))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (prompt_embeds (B, 77, D), pooled (B, D2) for SDXL else None)."""
        if self.cache_size <= 0:
            return self._encode(captions)
        rows = []
        for caption in captions:
            hit = self._cache.get(caption)
            if hit is None:
                emb, pooled = self._encode([caption])
                hit = (emb[0], None if pooled is None else pooled[0])
                self._cache[caption] = hit
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(caption)
            rows.append(hit)
        embeds = torch.stack([r[0] for r in rows])
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return embeds, pooled
