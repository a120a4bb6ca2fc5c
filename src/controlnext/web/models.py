"""Model choices of the web app: what can be picked, how a pick is validated, and the loaded-pipeline cache.

A :class:`ModelSpec` names a base model and a control module by reference:

* ``"demo"``-style built-ins resolved by :func:`default_model` (the shipped shapes demo when installed, else a tiny
  random model built with :mod:`controlnext.testing.models`, so the app always opens offline);
* a local diffusers folder (``model_index.json``), a single ``.safetensors`` checkpoint, or a hub id ``owner/name``
  (downloaded only when online) for the base;
* a control-module file, ``save_pretrained`` folder or hub id for ``controlnext``;
* an optional LoRA (file or folder) with a weight.
"""

from __future__ import annotations

import re
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "TINY",
    "LoadedModel",
    "ModelCache",
    "ModelSpec",
    "default_model",
    "demo_models",
    "validate_base_ref",
    "validate_control_ref",
    "validate_lora_ref",
]

TINY = "tiny-random"  # built-in reference: tiny random SD1.5-layout model (offline fallback, for tests)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModelSpec:
    """One selectable (base model, control module) pair and the UI defaults that suit it."""

    label: str
    base: str
    controlnext: str | None
    preprocessor: str = "canny"  # preprocessor preselected for this module
    preprocessor_options: tuple[tuple[str, Any], ...] = ()
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    prompt: str = ""
    lora: str | None = None
    lora_weight: float = 1.0
    notes: str = ""
    max_side: int | None = None  # largest output side the base is meant for (the demo: its native size)
    unet_weights: str | None = None  # the trained UNet subset that goes with the module (values or deltas)

    def with_refs(self, base: str, controlnext: str | None, lora: str | None, lora_weight: float) -> ModelSpec:
        label = self.label if (base, controlnext) == (self.base, self.controlnext) else f"{base} + {controlnext}"
        max_side = self.max_side if base == self.base else None  # the size limit belongs to the base model
        # The UNet subset was trained with its module on its base: it goes only with both.
        unet_weights = self.unet_weights if (base, controlnext) == (self.base, self.controlnext) else None
        return replace(
            self, label=label, base=base, controlnext=controlnext, lora=lora, lora_weight=lora_weight,
            max_side=max_side, unet_weights=unet_weights,
        )  # fmt: skip


def demo_models() -> list[ModelSpec]:
    """The shipped shapes demo's (base, module) pairs, one per condition kind; empty when not installed."""
    try:
        from ..shapes.demo import DEMO_GUIDANCE, DEMO_STEPS, demo_assets
        from ..training.export import UNET_DELTAS_FILE
    except ImportError:  # a trimmed install without the demo module
        return []
    root = demo_assets()
    if root is None:
        return []
    specs = []
    for kind, pre, opts in (
        ("edges", "canny", (("low", 50), ("high", 150), ("per_channel", True))),
        ("mask", "mask", (("threshold", 128),)),
    ):
        module = root / kind / "controlnext.safetensors"
        deltas = root / kind / UNET_DELTAS_FILE
        if module.is_file():
            specs.append(
                ModelSpec(
                    label=f"shapes demo ({kind})",
                    base=str(root / "base"),
                    controlnext=str(module),
                    preprocessor=pre,
                    preprocessor_options=opts,
                    width=64,
                    height=64,
                    max_side=64,  # trained at 64x64 only: larger sizes cost time and give no better picture
                    steps=DEMO_STEPS,
                    guidance=DEMO_GUIDANCE,
                    prompt="a red star on a blue background",
                    notes="The shipped 64x64 shapes model: one coloured shape on a plain background.",
                    unet_weights=str(deltas) if deltas.is_file() else None,
                )
            )
    return specs


def default_model() -> ModelSpec:
    """The model the app opens on: the shipped demo (edges) when installed, else a tiny random model (offline)."""
    demos = demo_models()
    if demos:
        return demos[0]
    return ModelSpec(
        label="tiny random model (offline test model)",
        base=TINY,
        controlnext=TINY,
        width=64,
        height=64,
        steps=4,
        guidance=5.0,
        prompt="a red star on a blue background",
        notes="Random weights: output is noise-like. Pick a real model to get pictures.",
    )


# ---------------------------------------------------------------------- validation of typed references
def _check_hub_id(ref: str, what: str) -> str:
    if _HUB_ID.match(ref):
        return ref
    raise FileNotFoundError(f"{what} {ref!r} is neither an existing local path nor a hub id of the form 'owner/name'.")


def validate_base_ref(ref: str) -> str:
    """A base model reference: the tiny model, a diffusers folder, a single ``.safetensors`` file, or a hub id."""
    ref = (ref or "").strip()
    if not ref:
        raise ValueError("Choose a base model.")
    if ref == TINY:
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers model folder (it has no model_index.json).")
        return str(path)
    if path.is_file():
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            raise ValueError(f"Single-file base models must be .safetensors (got {path.name}); pickles are refused.")
        return str(path)
    return _check_hub_id(ref, "Base model")


def validate_control_ref(ref: str | None) -> str | None:
    """A control module reference: the tiny module, a file, a ``save_pretrained`` folder, a hub id, or none."""
    ref = (ref or "").strip()
    if not ref or ref.lower() == "none":
        return None
    if ref == TINY:
        return ref
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"Control module files are .safetensors or .bin, got {path.name}.")
        return str(path)
    if path.is_dir():
        return str(path)
    return _check_hub_id(ref, "Control module")


def validate_lora_ref(ref: str | None) -> str | None:
    """A LoRA reference: a ``.safetensors`` file, a folder holding one, a hub id, or none."""
    ref = (ref or "").strip()
    if not ref:
        return None
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"LoRA files must be .safetensors, got {path.name}.")
        return str(path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"LoRA folder {path} holds no .safetensors file.")
        return str(path)
    return _check_hub_id(ref, "LoRA")


# ---------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A ready pipeline plus the lock that serialises generations on it."""

    spec: ModelSpec
    pipe: Any
    family: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    lora_loaded: str | None = None

    @property
    def has_control(self) -> bool:
        return bool(self.pipe.controlnext_modules)


def _device_and_dtype(family: Any = None):
    """The device and weights dtype: float16 on CUDA, bfloat16 there for the transformer families (SD3 and Flux
    are run in bfloat16; Flux overflows in float16), float32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        transformer = family is not None and family.denoiser == "transformer"
        return "cuda", torch.bfloat16 if transformer and torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def _load_base(base: str, dtype):
    if base == TINY:
        from ..pipelines import StableDiffusionControlNeXtPipeline
        from ..testing import tiny_pipeline_components

        return StableDiffusionControlNeXtPipeline(**tiny_pipeline_components("sd15", tempfile.mkdtemp(prefix="cnx-")))
    from ..families import detect_family

    family = detect_family(base)
    cls = family.pipeline_class()
    extra = dict(family.pipeline_kwargs)
    try:
        if Path(base).is_file():
            return cls.from_single_file(base, torch_dtype=dtype, **extra)
        return cls.from_pretrained(base, torch_dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if not Path(base).exists():
            hint = " Hub ids need an internet connection (or a local copy in the Hugging Face cache)."
        elif Path(base).is_file():
            hint = " Single-file checkpoints need their diffusers config (fetched online); offline use a folder."
        raise FileNotFoundError(f"Could not load the base model {base!r}: {first}.{hint}") from err


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the pipeline for ``spec`` (base, control module, LoRA) on the best available device."""
    from ..families import detect_family

    base = validate_base_ref(spec.base)
    control = validate_control_ref(spec.controlnext)
    lora = validate_lora_ref(spec.lora)
    device, dtype = _device_and_dtype(None if base == TINY else detect_family(base))
    pipe = _load_base(base, dtype)
    fam = detect_family(pipe)
    family = fam.name
    if control == TINY:
        from ..testing import tiny_controlnext

        config = getattr(pipe, fam.denoiser).config
        if fam.denoiser == "transformer":  # the token layout at the transformer's width
            width = config.num_attention_heads * config.attention_head_dim
            module = tiny_controlnext(fam.light_variant, out_channels=width)
        else:
            module = tiny_controlnext("sd15-training", out_channels=config.block_out_channels[0])
        pipe.set_controlnext(module)
    elif control is not None:
        try:
            pipe.load_controlnext(control)
        except OSError as err:
            raise FileNotFoundError(f"Could not load the control module {control!r}: {err}") from err
        if spec.unet_weights:
            pipe.load_unet_weights(spec.unet_weights)
    # Components were loaded in ``dtype`` already; the tiny model is built in float32 and cast only on GPU.
    pipe = pipe.to(device, dtype) if device != "cpu" else pipe
    loaded = LoadedModel(spec=spec, pipe=pipe, family=family)
    if lora:
        try:
            pipe.load_lora_weights(lora, adapter_name="user_lora")
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"Could not load the LoRA {lora!r} into this {family} model: {err}") from err
        loaded.lora_loaded = lora
    pipe.set_progress_bar_config(desc="denoising")
    return loaded


class ModelCache:
    """Keeps the most recently used pipelines (``capacity`` of them) keyed by (base, control, LoRA)."""

    def __init__(self, capacity: int = 1):
        self.capacity = max(1, capacity)
        self._items: dict[tuple, LoadedModel] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: ModelSpec) -> tuple:
        return (spec.base, spec.controlnext, spec.lora)

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model for ``spec``, loading it (and evicting the oldest) when needed."""
        k = self.key(spec)
        with self._lock:
            if k in self._items:
                self._items[k] = self._items.pop(k)  # most recent last
                loaded = self._items[k]
                loaded.spec = spec
                return loaded
            while len(self._items) >= self.capacity:
                self._items.pop(next(iter(self._items)))
            loaded = load_model(spec)
            self._items[k] = loaded
            return loaded

    def loaded_specs(self) -> list[ModelSpec]:
        return [m.spec for m in self._items.values()]
