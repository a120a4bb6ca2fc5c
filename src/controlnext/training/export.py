"""Final outputs of a training run: the control module (folder and single file), the trained UNet subset, a model card.

The control module file is written by :func:`controlnext.loading.save_controlnext_file`, so that training and
inference share one definition of the published layout; the UNet subset in the format that
:func:`controlnext.loading.load_unet_weights` reads. Weights are written into a temporary folder first and moved
into place when complete (:func:`staged_outputs`), so an interrupted export never leaves a partial file or folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..sources import HUB_ID, is_local_path
from .checkpoint import _commit, finish_safetensors, fsync_tree

__all__ = [
    "CONTROL_FILE",
    "CONTROL_FOLDER",
    "UNET_DELTAS_FILE",
    "UNET_VALUES_FILE",
    "export_outputs",
    "save_control_file",
    "save_unet_subset",
    "staged_outputs",
    "write_model_card",
]

CONTROL_FOLDER = "controlnext"
CONTROL_FILE = "controlnext.safetensors"
UNET_VALUES_FILE = "unet_weights.safetensors"
# The published SDXL release calls its delta file this (sic), and its loader adds it to the base UNet.
UNET_DELTAS_FILE = "unet_weight_increasements.safetensors"


STAGING = ".tmp-export"


@contextlib.contextmanager
def staged_outputs(output_dir: str | Path) -> Iterator[Path]:
    """A temporary folder for outputs; when the block succeeds, each entry replaces its namesake in ``output_dir``.

    Entries are made complete first (``.safetensors`` headers sorted and given the default mode, everything
    flushed to disk), then moved with one rename each: a crash leaves every output either old or new, never
    partial. A staging folder left by a crash is removed by the next export.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in sorted(staging.rglob("*.safetensors")):
            finish_safetensors(path)
        fsync_tree(staging)
        for entry in sorted(staging.iterdir()):
            if entry.is_dir():
                _commit(entry, output_dir / entry.name)
            else:
                os.replace(entry, output_dir / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_control_file(module, path: str | Path) -> Path:
    """Write the control module as one ``.safetensors`` in the published layout (variant and config in metadata)."""
    from ..loading import save_controlnext_file

    return finish_safetensors(save_controlnext_file(module, path))


def save_unet_subset(
    values: dict[str, torch.Tensor], path: str | Path, base_values: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write trained UNet parameters (name -> tensor) as values, or as deltas from ``base_values`` when given.

    The file is what :func:`controlnext.loading.load_unet_weights` reads: UNet parameter names as keys, and the
    mode in the ``controlnext_unet_weights`` metadata entry (the loader's name-based rule agrees with ours too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, value in values.items():
        value = value.detach().to("cpu", torch.float32)
        out[name] = (
            value - base_values[name].to("cpu", torch.float32) if base_values is not None else value
        ).contiguous()
    mode = "deltas" if base_values is not None else "values"
    save_file(out, str(path), metadata={"controlnext_unet_weights": mode})
    return finish_safetensors(path)


def card_base_model(base: str) -> str:
    """The card's ``base_model:``: the hub id of a hub base, else the folder's name (never a path of this machine)."""
    if HUB_ID.match(base) and not is_local_path(base) and not Path(base).exists():
        return base
    return Path(base).expanduser().resolve().name or base


def _count(n: float, word: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0.75 epochs``."""
    shown = f"{n:g}" if float(n).is_integer() else f"{n:.2f}"
    return f"{shown} {word}" if float(n) == 1 else f"{shown} {word}s"


def write_model_card(output_dir: Path, info: dict) -> Path:
    """README.md: what was trained from what, on which data, for how long, with which command."""
    base = card_base_model(info["base_model"])
    files = "\n".join(f"- `{f}`: {desc}" for f, desc in info["files"].items())
    settings = "\n".join(f"| {k} | {v} |" for k, v in info["settings"].items())
    bad = info.get("bad_rows", 0)
    duration = f"{_count(info['steps'], 'optimisation step')} ({_count(info['epochs'], 'epoch')})"
    card = f"""---
base_model: {base}
library_name: controlnext
tags:
- controlnext
- {info["family"]}
- text-to-image
---

# ControlNeXt control module ({info["variant"]}, {info["control_injection"]}) for `{base}`

Trained with `controlnext train` for {duration} on
`{info["dataset"]}` ({info["rows"]} rows used, {bad} bad rows skipped). Final training loss
(mean of the last {info["loss_window"]} steps): {info["final_loss"]:.5f}.

## Files

{files}

## Training settings

| setting | value |
|---|---|
{settings}

## Command line

```
{info["command"]}
```

## Use

Load the module with `controlnext.loading.load_controlnext("{CONTROL_FILE}")` (or the `{CONTROL_FOLDER}/`
folder) and the trained UNet subset with `controlnext.loading.load_unet_weights(unet, "<file>")`, then pass the
module to a ControlNeXt pipeline as `controlnext=` with `control_image=`.
"""
    path = Path(output_dir) / "README.md"
    path.write_text(card)
    return path


def export_outputs(
    output_dir: Path,
    control_config,
    state: dict[str, torch.Tensor],
    base_values: dict[str, torch.Tensor] | None,
    unet_format: str = "values",
) -> dict[str, str]:
    """Write the control module (folder and single file) and the UNet subset; returns {file name: description}.

    ``state`` holds the trained tensors: ``controlnext.<key>`` for the module (built from ``control_config``) and
    ``<backbone>.<name>`` for the backbone's parameters (``unet.``, or ``transformer.`` for the DiT families; the
    file keeps the release's name, ``unet_weights.safetensors``, for both).
    """
    from ..models.controlnext import ControlNeXtModel

    module = ControlNeXtModel.from_config(control_config)
    module.load_state_dict({k[len("controlnext.") :]: v for k, v in state.items() if k.startswith("controlnext.")})
    files = {
        f"{CONTROL_FOLDER}/": "the control module (diffusers `save_pretrained` folder)",
        CONTROL_FILE: "the control module as one file in the published layout",
    }
    unet = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] in ("unet", "transformer")}
    with staged_outputs(output_dir) as staging:
        module.save_pretrained(str(staging / CONTROL_FOLDER))
        save_control_file(module, staging / CONTROL_FILE)
        if unet:
            if unet_format == "deltas":
                save_unet_subset(unet, staging / UNET_DELTAS_FILE, base_values)
                files[UNET_DELTAS_FILE] = f"trained UNet parameters ({len(unet)} tensors) as deltas from the base"
            else:
                save_unet_subset(unet, staging / UNET_VALUES_FILE)
                files[UNET_VALUES_FILE] = f"trained UNet parameters ({len(unet)} tensors) as values"
    return files
