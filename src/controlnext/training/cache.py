"""Precomputed caches: VAE latents and text embeddings written once as shards, read instead of images and captions.

``controlnext make-shards SOURCE OUT --cache-latents --base MODEL`` runs the frozen encoders once per sample and
writes, per sample, ``KEY.cache.safetensors`` (the VAE posterior's mean and std, every caption's embeddings and
SDXL's time ids) beside the condition image, and ``empty_prompt.safetensors`` (the embedding caption dropout
uses). Training then samples the latents from the stored posterior with each sample's own generator, exactly as
from a live VAE.

Images are centre-cropped to the resolution when the cache is made (there is one latent per sample, so no random
crop or flip later). The index records what the cache depends on -- the family, resolution, the SHA-256 of each
encoder's config and weights as they ran (VAE, text encoders, tokenizers) and their dtypes -- and
:func:`check_cache` refuses a cache made with another encoder, resolution or dtype before training starts.

Text embeddings go through one function per family (:func:`register_text_embedder`), so that a family with other
text encoders (SD3's and Flux's T5) adds its own and the cache format stays the same: named tensors per caption.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .data import BadRowError, RawRow, _decode, load_sample

__all__ = [
    "CACHE_COLUMNS",
    "CachedSample",
    "LatentDist",
    "cache_identity",
    "cached_prompts",
    "check_cache",
    "collate_cached",
    "encoder_dtypes",
    "register_text_embedder",
    "text_embedder",
]

EMPTY_PROMPT = "empty_prompt.safetensors"
CACHE_MEMBER = "cache.safetensors"
# The members of a cached sample: the tensors stand where the image was, the captions are kept for reports.
CACHE_COLUMNS = dict(image="cache", condition="conditioning_image", caption="json")
_CACHE_KIND = "latents+text"

TextEmbedder = Callable[[Any, list[str], torch.device, torch.dtype, "int | None"], dict[str, torch.Tensor]]
_TEXT_EMBEDDERS: dict[str, TextEmbedder] = {}


def register_text_embedder(family: str, embed: TextEmbedder) -> None:
    """Register ``embed(base, captions, device, dtype, text_tokens) -> {name: (len(captions), ...) tensor}`` for
    ``family`` (``text_tokens``: the T5 sequence length of the transformer families, None for the others).

    The names are what the training step reads back (SD1.5/SDXL: ``prompt_embeds`` and, for SDXL,
    ``pooled_prompt_embeds``). Each caption must be encoded on its own so that embeddings do not depend on batching.
    """
    _TEXT_EMBEDDERS[family] = embed


def text_embedder(family: str) -> TextEmbedder:
    try:
        return _TEXT_EMBEDDERS[family]
    except KeyError:
        raise ValueError(
            f"No text embedding cache for the {family} family yet (known: {', '.join(sorted(_TEXT_EMBEDDERS))}); "
            "register one with controlnext.training.cache.register_text_embedder."
        ) from None


def _clip_embed(base: Any, captions: list[str], device: torch.device, dtype: torch.dtype, tokens=None) -> dict:
    """SD1.5 and SDXL: the training loop's own prompt encoding (one caption at a time, as its cache does)."""
    from .base import PromptEncoder

    encoder = PromptEncoder(base, device, dtype, cache_size=len(captions) + 1)
    embeds, pooled = encoder(captions)
    out = {"prompt_embeds": embeds}
    if pooled is not None:
        out["pooled_prompt_embeds"] = pooled
    return out


def _transformer_embed(base: Any, captions: list[str], device: torch.device, dtype: torch.dtype,
                       tokens: int | None = None) -> dict:  # fmt: skip
    """SD3 and Flux: the stock pipeline's ``encode_prompt`` (T5 at ``tokens``), as the trainer calls it."""
    from .dit import TransformerPromptEncoder

    encoder = TransformerPromptEncoder(base, device, dtype, cache_size=len(captions) + 1, max_sequence_length=tokens)
    embeds, pooled = encoder(captions)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


for _family in ("sd15", "sdxl"):
    register_text_embedder(_family, _clip_embed)
for _family in ("sd3", "flux"):
    register_text_embedder(_family, _transformer_embed)


class LatentDist(NamedTuple):
    """A stored VAE posterior (what ``vae.encode(x).latent_dist`` gives the training step)."""

    mean: torch.Tensor
    std: torch.Tensor


def cached_prompts(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, pooled embeddings or None) of a cached batch, as ``PromptEncoder`` returns them."""
    return batch["prompt_embeds"], batch.get("pooled_prompt_embeds")


def encoder_dtypes(family: str, weight_dtype: torch.dtype, custom_vae: bool = False) -> tuple[torch.dtype, torch.dtype]:
    """(VAE dtype, text encoder dtype) of a run in ``weight_dtype``: the training loop's rule (the stock SDXL VAE
    stays float32, it overflows in half precision)."""
    from ..families import get_family

    return (torch.float32 if get_family(family).vae_fp32 and not custom_vae else weight_dtype), weight_dtype


# ------------------------------------------------------------------------------------------------ identity
def module_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's config and every tensor (name, dtype, shape, bytes) as it is now."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(items, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _tokenizer_sha256(tokenizer: Any) -> str:
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.model_max_length])
    return hashlib.sha256(text.encode()).hexdigest()


def text_tokens(base: Any, requested: int | None = None) -> int | None:
    """The T5 sequence length a run of a transformer family encodes captions at (``requested``, else the stock
    pipeline's default); None for the families without T5."""
    from ..families import get_family

    if get_family(base.family).denoiser != "transformer":
        return None
    from .dit import stock_sequence_length

    return requested or stock_sequence_length(base.family)


def cache_identity(base: Any, resolution: int, tokens: int | None = None) -> dict:
    """What a cache depends on: family, resolution, the T5 length (transformer families), and each encoder's hash
    and dtype as it runs now."""
    return {
        "kind": _CACHE_KIND,
        "family": base.family,
        "resolution": resolution,
        "text_tokens": tokens,
        "vae": {"sha256": module_sha256(base.vae), "dtype": str(base.vae.dtype).replace("torch.", "")},
        "text_encoders": [{"sha256": module_sha256(e), "dtype": str(e.dtype).replace("torch.", "")}
                          for e in base.text_encoders],  # fmt: skip
        "tokenizers": [_tokenizer_sha256(t) for t in base.tokenizers],
    }


def check_cache(record: dict, base: Any, resolution: int, where: str, tokens: int | None = None) -> None:
    """Raise ValueError unless the cache ``record`` (from ``shards.json``) was made with this run's encoders,
    resolution, T5 length and dtypes; the error names each difference."""
    if not isinstance(record, dict) or record.get("kind") != _CACHE_KIND:
        raise ValueError(f"{where}: its shards.json has no {_CACHE_KIND} cache record.")
    now = cache_identity(base, resolution, tokens)
    rebuild = "rebuild it with `controlnext make-shards SOURCE OUT --cache-latents --base MODEL` for this run."
    problems = []
    if record.get("family") != now["family"]:
        problems.append(f"family {record.get('family')} -> {now['family']}")
    if record.get("resolution") != resolution:
        problems.append(f"resolution {record.get('resolution')} -> {resolution}")
    if record.get("text_tokens") != tokens:
        problems.append(f"T5 length (--max-sequence-length) {record.get('text_tokens')} -> {tokens}")
    pairs = [("VAE", record.get("vae") or {}, now["vae"])]
    pairs += [(f"text encoder {i + 1}", r, n)
              for i, (r, n) in enumerate(zip(record.get("text_encoders") or [], now["text_encoders"]))]  # fmt: skip
    for what, was, new in pairs:
        if was.get("dtype") != new["dtype"]:
            problems.append(f"{what} dtype {was.get('dtype')} -> {new['dtype']}")
        elif was.get("sha256") != new["sha256"]:
            problems.append(f"{what} is another model (SHA-256 {str(was.get('sha256'))[:12]} -> {new['sha256'][:12]})")
    if len(record.get("text_encoders") or []) != len(now["text_encoders"]):
        problems.append(f"{len(record.get('text_encoders') or [])} text encoders -> {len(now['text_encoders'])}")
    elif record.get("tokenizers") != now["tokenizers"]:
        problems.append("another tokenizer")
    if problems:
        raise ValueError(f"{where} is a cache made with other encoders or settings ({'; '.join(problems)}): " + rebuild)


# ------------------------------------------------------------------------------------------------ building
def _save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


def _load_tensors(data: bytes, row_id: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except (SafetensorError, ValueError, OSError) as err:
        raise BadRowError(row_id, f"cache tensors are damaged ({err})") from None


class CacheBuilder:
    """Encodes rows for a cache: ``members(raw)`` gives the tar members of one row (the VAE runs per row)."""

    def __init__(self, base: Any, resolution: int, device: torch.device, tokens: int | None = None):
        self.base = base
        self.resolution = resolution
        self.device = device
        self.tokens = tokens  # the T5 length of a transformer family (see :func:`text_tokens`)
        self.embed = text_embedder(base.family)
        self.text_dtype = base.text_encoders[0].dtype

    @torch.no_grad()
    def members(self, raw: RawRow) -> dict[str, bytes]:
        from .shards import image_bytes

        sample = load_sample(raw, 0, 0, (self.resolution, self.resolution), 0, center_crop=True)
        vae = self.base.vae
        pixels = sample["pixel_values"][None].to(self.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        captions = list(raw.caption) if isinstance(raw.caption, (list, tuple)) else [raw.caption or ""]
        tensors = {"latent_mean": dist.mean[0], "latent_std": dist.std[0], "time_ids": sample["time_ids"]}
        tensors.update(self.embed(self.base, captions, self.device, self.text_dtype, self.tokens))
        try:
            cond, ext = image_bytes(raw.condition)
        except (OSError, ValueError) as err:
            raise BadRowError(raw.row_id, f"condition could not be read ({err})") from None
        return {CACHE_MEMBER: _save_tensors(tensors), f"conditioning_image.{ext}": cond,
                "json": json.dumps(captions).encode()}  # fmt: skip

    @torch.no_grad()
    def empty_prompt(self) -> bytes:
        empty = self.embed(self.base, [""], self.device, self.text_dtype, self.tokens)
        return _save_tensors({k: v[0] for k, v in empty.items()})


def write_empty_prompt(out: Path, data: bytes) -> dict:
    (Path(out) / EMPTY_PROMPT).write_bytes(data)
    return {"file": EMPTY_PROMPT, "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class CachedSample:
    """Turns a cached row into a training sample (condition centre-cropped to the resolution; caption choice and
    dropout from (seed, epoch, index) like :func:`~controlnext.training.data.load_sample`)."""

    resolution: int
    seed: int
    caption_dropout: float
    empty: dict[str, torch.Tensor]

    def __call__(self, raw: RawRow, epoch: int, index: int) -> dict:
        tensors = _load_tensors(raw.image, raw.row_id)
        missing = {"latent_mean", "latent_std", "time_ids", *self.empty} - set(tensors)
        if missing:
            raise BadRowError(raw.row_id, f"cache tensors lack {sorted(missing)}")
        count = tensors[next(iter(self.empty))].shape[0]
        # load_sample crops the condition and draws the caption choice and dropout; the "captions" are indices
        choices = [str(i) for i in range(count)]
        row = RawRow(raw.row_id, raw.condition, raw.condition, choices)
        size = (self.resolution, self.resolution)
        sample = load_sample(row, epoch, index, size, self.seed, center_crop=True, caption_dropout=self.caption_dropout)
        chosen = sample["caption"]
        out = {k: (tensors[k][int(chosen)] if chosen else v) for k, v in self.empty.items()}
        out.update(latent_mean=tensors["latent_mean"], latent_std=tensors["latent_std"], time_ids=tensors["time_ids"],
                   conditioning=sample["conditioning"], row_id=raw.row_id, caption="")  # fmt: skip
        return out


def collate_cached(samples: list[dict]) -> dict:
    """Stack cached samples (every tensor field), keeping captions and row ids as lists."""
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([s[key] for s in samples]).contiguous()
    out["captions"] = [s["caption"] for s in samples]
    out["row_ids"] = [s["row_id"] for s in samples]
    out["bad_rows"] = [b for s in samples for b in s.get("bad_rows", [])]
    return out


def open_cached(record: dict, root: str | None, base: Any, resolution: int, seed: int, caption_dropout: float,
                where: str, tokens: int | None = None) -> CachedSample:  # fmt: skip
    """Check a cache against this run (``tokens``: its T5 length, see :func:`text_tokens`) and load its
    empty-caption embedding."""
    from safetensors.torch import load

    check_cache(record, base, resolution, where, tokens)
    empty = record.get("empty_prompt") or {}
    path = Path(root or ".") / str(empty.get("file", EMPTY_PROMPT))
    if not path.is_file():
        raise ValueError(f"{where}: the cache's {path.name} is missing; rebuild the cache with make-shards.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != empty.get("sha256"):
        raise ValueError(f"{where}: {path.name} changed since the cache was written (SHA-256 mismatch).")
    return CachedSample(resolution, seed, caption_dropout, load(data))


def check_cached_row(raw: RawRow) -> None:
    """check-shards for a cache: its tensors load and its condition decodes."""
    tensors = _load_tensors(raw.image, raw.row_id)
    if "latent_mean" not in tensors:
        raise BadRowError(raw.row_id, "cache tensors lack latent_mean")
    _decode(raw.condition, "condition", raw.row_id)

