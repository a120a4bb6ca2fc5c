"""Loading and saving ControlNeXt modules and trained UNet weights.

* :func:`read_state_dict` reads ``.safetensors`` or torch ``.bin``/``.pt`` files; pickled files are read tensors-only
  (``torch.load(weights_only=True)``); arbitrary unpickling happens only with ``allow_pickle=True``.
* :func:`load_controlnext` takes a ``save_pretrained`` folder, a hub id, or one published-layout file and detects the
  published variant from the file's keys and shapes.
* :func:`load_unet_weights` applies a trained UNet subset, given as values or as additive deltas (the published
  ``unet_weight_increasements`` files), with strict key and shape checks.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .families import family_of_variant, get_family
from .models.controlnext import ControlNeXtModel
from .models.variants import DIT_VARIANTS, VARIANTS

# Layouts a file's keys and shapes are matched against: the published ones, and the transformer layouts at their
# reference widths (a file without metadata, or one loaded with variant=).
_LAYOUTS = (*VARIANTS, *DIT_VARIANTS)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _check_family(what: str | Path, model: ControlNeXtModel, family: str | None) -> None:
    """Refuse a module made for another family (its ``family`` field, else its published variant's family)."""
    variant = model.config.variant
    made_for = get_family(model.config.family) if model.config.family else family_of_variant(variant)
    if family is not None and made_for is not None and made_for is not get_family(family):
        fam = get_family(family)
        raise ValueError(
            f"{what} looks like a {variant!r} module (for {made_for.name} {made_for.kind}s) but the {fam.kind} is "
            f"{fam.name}: use a module made for {fam.title}."
        )


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a tensor file; returns (state_dict, metadata). Metadata is empty for torch pickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable .safetensors file (corrupt or truncated?): {err}") from err
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"Unsupported weights file {path.name}; expected .safetensors or one of {PICKLE_SUFFIXES}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors, so it was not unpickled (that could run code). If you trust "
            f"the file, pass allow_pickle=True (CLI: --allow-pickle)."
        ) from err
    except Exception as err:  # the unpickler fails on garbage with any error type (KeyError, IndexError, ...)
        raise ValueError(f"{path} is not a readable torch file (corrupt or truncated?): {err!r}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict).")
    return obj, {}


def _variant_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = ControlNeXtModel.from_variant(name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_variants(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Variants (published, or transformer layouts) whose key names and shapes equal ``state_dict``'s exactly."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [name for name in _LAYOUTS if _variant_shapes(name) == shapes]


def _mismatch_report(state_dict: dict[str, torch.Tensor]) -> str:
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    best, best_diff = None, None
    for name in _LAYOUTS:
        ref = _variant_shapes(name)
        missing = sorted(set(ref) - set(shapes))
        unexpected = sorted(set(shapes) - set(ref))
        wrong = sorted(k for k in set(ref) & set(shapes) if ref[k] != shapes[k])
        score = len(missing) + len(unexpected) + len(wrong)
        if best_diff is None or score < best_diff[0]:
            best, best_diff = name, (score, missing, unexpected, wrong, ref)
    _, missing, unexpected, wrong, ref = best_diff

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = [f"closest published variant: {best!r}"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if wrong:
        parts.append("wrong shapes: " + few([f"{k} {shapes[k]} (expected {ref[k]})" for k in wrong]))
    return "; ".join(parts)


def load_controlnext_file(
    path: str | Path,
    variant: str | None = None,
    family: str | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> ControlNeXtModel:
    """Load one ``.safetensors``/``.bin`` control-module file with strict key checks.

    The config comes from the file's metadata when it was saved by :func:`save_controlnext_file`; otherwise the
    published variant is detected from keys and shapes. ``sd15-training``, ``sdxl`` and ``svd-v2`` share one layout:
    ``variant`` or the UNet ``family`` ("sd15", "sdxl", "svd") picks among them (a ``.safetensors`` file without
    either is taken as ``sdxl``, the only release of that layout in that format).
    """
    state_dict, meta = read_state_dict(path, allow_pickle=allow_pickle)
    if "controlnext_config" in meta and variant is None:
        config = json.loads(meta["controlnext_config"])
        model = ControlNeXtModel.from_config(config)
    else:
        candidates = match_variants(state_dict)
        if not candidates:
            raise ValueError(
                f"{path} is not a ControlNeXt module in any published layout: {_mismatch_report(state_dict)}"
            )
        chosen = variant or meta.get("controlnext_variant")
        if chosen is None and len(candidates) == 1:
            chosen = candidates[0]
        if chosen is None and family is not None:
            chosen = get_family(family).light_variant
        if chosen is None and Path(path).suffix == ".safetensors":
            chosen = "sdxl"
        if chosen is None:
            raise ValueError(
                f"{path} matches the layouts {candidates}, which differ only in how they are applied; pass "
                f"variant= one of them (CLI: --controlnext-variant), or load it through a pipeline (it knows its UNet)."
            )
        if chosen not in candidates:
            raise ValueError(
                f"{path} does not have the layout of variant {chosen!r}; it looks like {candidates}."
                if candidates
                else f"{path}: {_mismatch_report(state_dict)}"
            )
        model = ControlNeXtModel.from_variant(chosen)
    _check_family(path, model, family)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not match its declared config: {_mismatch_report(state_dict)}")
    model.eval()
    return model.to(torch_dtype) if torch_dtype is not None else model


def load_controlnext(
    path_or_id: str | Path,
    variant: str | None = None,
    family: str | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    **hub_kwargs,
) -> ControlNeXtModel:
    """Load a control module from a single file, a ``save_pretrained`` folder, or a hub id (when online)."""
    p = Path(path_or_id)
    if p.is_file():
        return load_controlnext_file(p, variant, family, allow_pickle, torch_dtype)
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", *PICKLE_SUFFIXES))
        if len(files) == 1:
            return load_controlnext_file(files[0], variant, family, allow_pickle, torch_dtype)
        raise FileNotFoundError(
            f"{p} has no config.json (a save_pretrained folder) and not exactly one weights file (found "
            f"{[f.name for f in files]}); point to the file itself."
        )
    text = str(path_or_id)
    if (
        not p.exists()
        and not p.is_absolute()
        and text.count("/") >= 2
        and p.suffix in (".safetensors", *PICKLE_SUFFIXES)
    ):
        # A published single file on the hub: "owner/name/path/in/repo/file.safetensors".
        owner, name, filename = text.split("/", 2)
        return load_controlnext_file(
            _hub_file(f"{owner}/{name}", filename, **hub_kwargs), variant, family, allow_pickle, torch_dtype
        )
    if not p.exists() and (p.is_absolute() or text.startswith(".") or text.count("/") != 1):
        raise FileNotFoundError(
            f"No file or folder at {p}, and it is not a hub id ('owner/name', or 'owner/name/file.safetensors')."
        )
    try:
        model = ControlNeXtModel.from_pretrained(str(path_or_id), torch_dtype=torch_dtype, **hub_kwargs)
    except OSError as err:
        raise FileNotFoundError(f"Could not load a ControlNeXt module from {path_or_id!r}: {err}") from err
    _check_family(path_or_id, model, family)
    return model.eval()


def _hub_file(repo_id: str, filename: str, **hub_kwargs) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except Exception as err:  # offline, missing repo or file: one clear message
        raise FileNotFoundError(f"Could not fetch {filename!r} from the hub repository {repo_id!r}: {err}") from err


def save_controlnext_file(module: ControlNeXtModel, path: str | Path) -> Path:
    """Save one ``.safetensors`` in the published key layout, with the variant and full config as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    meta = {"controlnext_variant": str(module.config.variant), "controlnext_config": json.dumps(config)}
    save_file(state, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------- UNet subsets and deltas
def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("unet.") for k in state_dict):
        return {k[len("unet.") :]: v for k, v in state_dict.items()}
    return state_dict


def unet_weights_mode(path: str | Path, meta: dict[str, str]) -> str:
    """'deltas' or 'values' for a UNet weights file: metadata, else the model zoo's entry, else the file name."""
    if meta.get("controlnext_unet_weights") in ("values", "deltas"):
        return meta["controlnext_unet_weights"]
    from .zoo import unet_mode_of

    if (published := unet_mode_of(path)) is not None:  # a release file in the hub cache: the table knows
        return published
    name = Path(path).name.lower()
    return "deltas" if ("increase" in name or "delta" in name) else "values"


def load_unet_weights(
    unet: torch.nn.Module,
    path: str | Path,
    mode: str = "auto",
    allow_pickle: bool = False,
    originals: dict[str, torch.Tensor] | None = None,
) -> tuple[str, list[str]]:
    """Load trained UNet parameters from ``path`` into ``unet`` in place; returns (mode used, keys loaded).

    ``mode``: "values" (replace), "deltas" (add to the base weights, as the published ``*increasements*`` files),
    or "auto" (metadata written by :func:`save_unet_weights`, else "deltas" for files whose name says increase or
    delta, else "values"). Every key must exist in the UNet with the same shape. ``originals``, when given, receives
    a CPU copy of each changed tensor's value before the change (unless it already holds one), to undo it later.
    """
    if mode not in ("auto", "values", "deltas"):
        raise ValueError(f"mode must be 'auto', 'values' or 'deltas', got {mode!r}.")
    state_dict, meta = read_state_dict(path, allow_pickle=allow_pickle)
    state_dict = _strip_prefix(state_dict)
    if mode == "auto":
        mode = unet_weights_mode(path, meta)
    params = dict(unet.named_parameters())
    params.update(dict(unet.named_buffers()))
    unexpected = sorted(set(state_dict) - set(params))
    if unexpected:
        raise ValueError(
            f"{path} has {len(unexpected)} keys that this UNet does not have (e.g. {unexpected[:4]}); is it for "
            f"another base model family (SD1.5 / SDXL / SVD)?"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state_dict.items() if v.shape != params[k].shape
    ]
    if wrong:
        raise ValueError(f"{path} has tensors whose shapes do not match this UNet: {wrong[:4]}")
    with torch.no_grad():
        for k, v in state_dict.items():
            target = params[k]
            if originals is not None and k not in originals:
                originals[k] = target.detach().to("cpu", copy=True)
            v = v.to(device=target.device, dtype=target.dtype)
            target.add_(v) if mode == "deltas" else target.copy_(v)
    logger.info("Loaded %d UNet tensors from %s as %s.", len(state_dict), path, mode)
    return mode, sorted(state_dict)


def select_parameters(unet: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of UNet parameters matched by any regex in ``patterns`` (``re.search``)."""
    regs = [re.compile(p) for p in patterns]
    return [n for n, _ in unet.named_parameters() if any(r.search(n) for r in regs)]


def save_unet_weights(
    unet: torch.nn.Module,
    path: str | Path,
    names: Iterable[str],
    base_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the UNet parameters ``names`` as values, or as deltas from ``base_state_dict`` when it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(unet.named_parameters())
    out = {}
    for n in names:
        v = params[n].detach().float().cpu()
        out[n] = (v - base_state_dict[n].float().cpu() if base_state_dict is not None else v).contiguous()
    mode = "deltas" if base_state_dict is not None else "values"
    save_file(out, str(path), metadata={"controlnext_unet_weights": mode})
    return path
