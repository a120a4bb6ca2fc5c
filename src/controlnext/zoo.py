"""The model zoo: every published ControlNeXt checkpoint (and the DWPose files the video releases use), by name.

:data:`ZOO` is data: one :class:`ZooEntry` per checkpoint, with its hub repository and files, the ControlNeXt
variant its module is read as, the base model it was trained on, its condition and the settings its authors run it
with. ``controlnext models`` lists it, ``controlnext download NAME`` fetches the files into the huggingface_hub
cache, and a name stands for its cached files wherever a control module is taken (``--controlnext sdxl-depth``).

Where each value comes from (repository dvlab-research/ControlNeXt, checked at commit ab4b3ac):

* SDXL repos and files: ``ControlNeXt-SDXL/README.md`` and ``examples/*/run.sh`` name the hub repos
  ``Eugeoter/controlnext-sdxl-anime-canny`` and ``Eugeoter/controlnext-sdxl-vidit-depth``, loaded with
  ``--load_weight_increasement`` (the UNet file holds deltas); the file names are the release pipeline's
  ``CONTROLNEXT_WEIGHT_NAME_SAFE`` / ``UNET_WEIGHT_NAME_SAFE`` (``controlnet.safetensors``, ``unet.safetensors``),
  which ``utils/tools.py`` always asks for (``use_safetensors=True``). Recommended scales: canny 0.35, depth 1.0,
  as the authors state in ``ControlNeXt-SDXL-Training/README.md`` ("For depth, we recommend 1.0, and for canny, we
  recommend 0.35", of ``--controlnet_scale_factor``) and in issue #36 of the repository (now
  JIA-Lab-research/ControlNeXt; Eugeoter, 2024-08-30: "for the Canny model, we set the controlnet_scale_factor to
  0.35 (for depth, it's 1.0)"). That training factor multiplies the same ``controls['scale']`` as the inference
  pipeline's ``controlnet_scale`` (our ``controlnext_conditioning_scale``). The inference example
  ``examples/anime_canny/run.sh`` passes 1.0: stronger control than the canny model was trained with, if it was
  trained at 0.35 as the issue says; the table follows the authors' recommendation. 20 steps: ``run_controlnext.py``'s
  ``--num_inference_steps`` default; guidance 5: the release pipeline's ``guidance_scale`` default (the scripts
  pass none).
* SD1.5: ``ControlNeXt-SD1.5/README.md`` says to download ``huggingface.co/Pbihao/ControlNeXt/tree/main/
  ControlNeXt-SD1.5`` into ``pretrained/``, and ``examples/<name>/script.sh`` load
  ``pretrained/<name>/controlnet.safetensors`` and ``unet.safetensors`` (values, no ``--load_weight_increasement``)
  for deepfashion_multiview, deepfashion_caption (pose), deepfashoin_mask (sic, mask) and vidit_depth. 20 steps
  (hard-coded in its ``run_controlnext.py``), guidance 7.5 and conditioning scale 1 (its pipeline's defaults;
  the module also has a learned scale).
* SVD v1: ``ControlNeXt-SVD/README.md`` (download ``Pbihao/ControlNeXt/tree/main/ControlNeXt-SVD/finetune``; the
  script loads ``controlnet.bin`` and the full UNet ``unet_fp16.bin``), 25 steps and guidance 3.5 (its
  ``run_controlnext.py`` defaults).
* SVD v2: ``ControlNeXt-SVD-v2/README.md`` (download ``.../ControlNeXt-SVD/v2``: ``controlnet.bin``, ``unet.bin``),
  25 steps (default), guidance 3 (the README's command).
* DWPose: the SVD-v2 README links Google Drive copies of ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``; the DWPose
  authors' README (IDEA-Research/DWPose, 2023/08/07 entry) says they uploaded all DWPose models to the hub repo
  ``yzd-v/DWPose``. Their sizes (216.7 MB, 134.4 MB) are as other projects' download scripts record them.

Not verified (no network): the hub repositories' file listings and sizes of the ControlNeXt files (``size_mb`` is
None), and their licences: the code repository is Apache-2.0; the hub model cards were not read, so ``license`` says
so. SD3: ``ControlNeXt-SD3/README.md`` says those weights cannot be released, so there is no entry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ZOO", "ZooEntry", "ZooError", "cache_dir", "download", "get_entry", "resolve", "unet_mode_of"]

_CODE_LICENSE = "unchecked (code: Apache-2.0)"  # the hub model cards were not read; the code repository's licence


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint. ``module``/``unet`` are paths inside ``repo``; ``files`` lists every file."""

    name: str
    family: str | None  # base-model family (controlnext.families); None for files that are not a control module
    variant: str | None  # the ControlNeXt variant (models/variants.py) the module file is read as
    condition: str
    repo: str
    module: str | None
    unet: str | None = None
    unet_mode: str | None = None  # "deltas" (added to the base UNet) or "values"
    base_model: str | None = None
    scale: float | None = None  # recommended control scale
    steps: int | None = None
    guidance: float | None = None
    license: str = _CODE_LICENSE
    size_mb: float | None = None  # total download, where known
    source: str = ""  # where the repo, files and settings were read
    extra_files: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.module, self.unet, *self.extra_files) if f)

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), files=list(self.files))


def _sdxl(name: str, repo: str, condition: str, base: str, example: str, scale: float) -> ZooEntry:
    return ZooEntry(
        name=name, family="sdxl", variant="sdxl", condition=condition, repo=repo, module="controlnet.safetensors",
        unet="unet.safetensors", unet_mode="deltas", base_model=base, scale=scale, steps=20, guidance=5.0,
        source=f"ControlNeXt-SDXL/README.md, examples/{example}/run.sh; scale: ControlNeXt-SDXL-Training/README.md, "
        "issue #36",
    )  # fmt: skip


def _sd15(name: str, folder: str, condition: str) -> ZooEntry:
    return ZooEntry(
        name=name, family="sd15", variant="sd15", condition=condition, repo="Pbihao/ControlNeXt",
        module=f"ControlNeXt-SD1.5/{folder}/controlnet.safetensors",
        unet=f"ControlNeXt-SD1.5/{folder}/unet.safetensors",
        unet_mode="values", base_model="runwayml/stable-diffusion-v1-5", scale=1.0, steps=20, guidance=7.5,
        source=f"ControlNeXt-SD1.5/README.md, examples/{folder}/script.sh",
    )  # fmt: skip


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _sdxl("sdxl-anime-canny", "Eugeoter/controlnext-sdxl-anime-canny", "canny", "neta-art/neta-xl-2.0",
              "anime_canny", scale=0.35),  # fmt: skip
        _sdxl("sdxl-depth", "Eugeoter/controlnext-sdxl-vidit-depth", "depth",
              "stabilityai/stable-diffusion-xl-base-1.0", "vidit_depth", scale=1.0),  # fmt: skip
        _sd15("sd15-pose", "deepfashion_multiview", "pose"),
        _sd15("sd15-pose-caption", "deepfashion_caption", "pose"),
        _sd15("sd15-mask", "deepfashoin_mask", "mask"),
        _sd15("sd15-depth", "vidit_depth", "depth"),
        ZooEntry(
            name="svd-v1", family="svd", variant="svd", condition="pose", repo="Pbihao/ControlNeXt",
            module="ControlNeXt-SVD/finetune/controlnet.bin", unet="ControlNeXt-SVD/finetune/unet_fp16.bin",
            unet_mode="values", base_model="stabilityai/stable-video-diffusion-img2vid-xt-1-1", scale=1.0, steps=25,
            guidance=3.5, source="ControlNeXt-SVD/README.md, script.sh, run_controlnext.py defaults",
        ),  # fmt: skip
        ZooEntry(
            name="svd-v2", family="svd", variant="svd-v2", condition="pose", repo="Pbihao/ControlNeXt",
            module="ControlNeXt-SVD/v2/controlnet.bin", unet="ControlNeXt-SVD/v2/unet.bin", unet_mode="values",
            base_model="stabilityai/stable-video-diffusion-img2vid-xt-1-1", scale=1.0, steps=25, guidance=3.0,
            source="ControlNeXt-SVD-v2/README.md, script.sh",
        ),  # fmt: skip
        ZooEntry(
            name="dwpose", family=None, variant=None, condition="pose detector (ONNX)", repo="yzd-v/DWPose",
            module=None, extra_files=("yolox_l.onnx", "dw-ll_ucoco_384.onnx"), license="Apache-2.0",
            size_mb=351.1, source="ControlNeXt-SVD-v2/README.md (step 4); IDEA-Research/DWPose README",
        ),  # fmt: skip
    )
}


class ZooError(ValueError):
    """A zoo name that cannot be used as asked (unknown, not downloaded while offline); the message is one line."""


def get_entry(name: str) -> ZooEntry | None:
    """The entry called ``name``, or None when ``name`` is not a zoo name (then it is a path or hub id)."""
    return ZOO.get(str(name))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _fetch(entry: ZooEntry, filename: str, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(entry.repo, filename, local_files_only=local_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        # hf_hub_download raises LocalEntryNotFoundError for "offline and not cached" and for "no connection".
        offline = _offline() or local_only or isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled))
        if offline:
            why = "HF_HUB_OFFLINE is set (unset it to download)" if _offline() else "the hub cannot be reached"
            raise ZooError(
                f"{entry.name}: {filename} from {entry.repo} is not in the hub cache and {why}; run "
                f"`controlnext download {entry.name}` with network access (same HF_HOME), or give a local file."
            ) from None
        raise ZooError(f"{entry.name}: could not fetch {filename} from {entry.repo}: {err}") from None


def download(name: str) -> list[Path]:
    """Fetch every file of ``name`` into the huggingface_hub cache (resumable, with its progress bar); their paths."""
    entry = _require(name)
    return [_fetch(entry, f, local_only=False) for f in entry.files]


def resolve(name: str, with_unet: bool = True) -> tuple[ZooEntry, Path | None, Path | None]:
    """(entry, module file, UNet file) of a zoo name: the cached files, fetched when missing and the hub is online.

    ``with_unet=False``: the module file only (the UNet file is None), for uses that do not apply it.
    """
    entry = _require(name)
    if entry.module is None:
        raise ZooError(f"{name} holds no control module (files: {', '.join(entry.files)}); see `controlnext models`")
    module = _fetch(entry, entry.module, local_only=_offline())
    unet = _fetch(entry, entry.unet, local_only=_offline()) if entry.unet and with_unet else None
    return entry, module, unet


def _require(name: str) -> ZooEntry:
    entry = get_entry(name)
    if entry is None:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(ZOO)} (see `controlnext models`)")
    return entry


def unet_mode_of(path: str | Path) -> str | None:
    """``values``/``deltas`` when ``path`` is a zoo entry's UNet file in the hub cache (its name does not say: the
    SDXL releases call their deltas ``unet.safetensors``), else None."""
    parts = Path(path).parts
    for entry in ZOO.values():
        folder = f"models--{entry.repo.replace('/', '--')}"
        if entry.unet and folder in parts:
            rest = parts[parts.index(folder) + 3 :]  # after snapshots/<commit>/
            if "/".join(rest) == entry.unet:
                return entry.unet_mode
    return None


def cache_dir() -> str:
    """The huggingface_hub cache folder downloads go to (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)
