"""One generation request of the web app: validated settings, the pipeline call, and reproducible PNG files.

Every result is saved as a PNG whose tEXt chunks record how it was made:

* ``controlnext``: JSON of :class:`GenerationSettings` with the *image's own* seed and batch size 1, plus the file
  name and SHA-256 of the condition image saved beside it, so one result can be regenerated on its own;
* ``parameters``: the same in the one-paragraph text form popular web UIs write (prompt, then
  ``Negative prompt:``, then ``Steps: .., Sampler: ..`` fields), which other tools display.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .limits import Limits

__all__ = [
    "GenerationSettings",
    "GenerationStopped",
    "family_check",
    "METADATA_KEY",
    "generate",
    "read_settings",
    "save_png",
    "resolve_seed",
]

METADATA_KEY = "controlnext"
MAX_SEED = 2**32 - 1


@dataclass
class GenerationSettings:
    """Everything needed to reproduce an image (besides the condition image itself)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    seed: int = 0
    batch_size: int = 1
    width: int = 512
    height: int = 512
    base: str = ""
    controlnext: str | None = None
    lora: str | None = None
    lora_weight: float = 1.0
    preprocessor: str = "none"
    preprocessor_options: dict[str, Any] = field(default_factory=dict)
    scheduler: str = ""

    def validate(self, limits: Limits, size_multiple: int = 8) -> None:
        """Raise ValueError with a one-line explanation for any value outside what the app accepts."""
        checks = [
            (1 <= self.steps <= limits.max_steps, f"Steps must be between 1 and {limits.max_steps}, got {self.steps}."),
            (
                0 <= self.guidance <= limits.max_guidance,
                f"Guidance must be between 0 and {limits.max_guidance:g}, got {self.guidance:g}.",
            ),
            (
                0 <= self.control_scale <= limits.max_control_scale,
                f"Control scale must be between 0 and {limits.max_control_scale:g}, got {self.control_scale:g}.",
            ),
            (
                0 <= self.control_start < self.control_end <= 1,
                "Control start must be below control end, both within 0..1 "
                f"(got {self.control_start:g} and {self.control_end:g}).",
            ),
            (
                1 <= self.batch_size <= limits.max_batch,
                f"Batch size must be between 1 and {limits.max_batch}, got {self.batch_size}.",
            ),
            (0 <= self.seed <= MAX_SEED, f"Seed must be between 0 and {MAX_SEED}, got {self.seed}."),
            (
                len(self.prompt) + len(self.negative_prompt) <= limits.max_prompt_chars,
                f"Prompts are limited to {limits.max_prompt_chars} characters.",
            ),
            (
                -5 <= self.lora_weight <= 5,
                f"LoRA weight must be between -5 and 5, got {self.lora_weight:g}.",
            ),
        ]
        for name in ("width", "height"):
            v = getattr(self, name)
            checks.append(
                (
                    limits.min_side <= v <= limits.max_side,
                    f"{name.capitalize()} must be between {limits.min_side} and {limits.max_side} pixels, got {v}.",
                )
            )
            checks.append(
                (v % size_multiple == 0, f"{name.capitalize()} must be a multiple of {size_multiple}, got {v}.")
            )
        for name in ("guidance", "control_scale", "control_start", "control_end", "lora_weight"):
            checks.append((math.isfinite(getattr(self, name)), f"{name.replace('_', ' ')} must be a finite number."))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def parameters_text(self) -> str:
        """The settings as the ``parameters`` text popular web UIs store and show."""
        fields_ = [
            f"Steps: {self.steps}",
            f"Sampler: {self.scheduler or 'default'}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {Path(self.base).name or self.base}",
            f"ControlNeXt: {Path(self.controlnext).name if self.controlnext else 'none'}",
            f"Control scale: {self.control_scale:g}",
            f"Control start: {self.control_start:g}",
            f"Control end: {self.control_end:g}",
            f"Preprocessor: {self.preprocessor}",
        ]
        if self.lora:
            fields_.append(f"LoRA: {Path(self.lora).name}:{self.lora_weight:g}")
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + "\n" + ", ".join(fields_)


def resolve_seed(seed: float | int | None, randomize: bool) -> int:
    """The seed to use: a fresh random one when asked (or none given), else ``seed`` checked to be a whole number."""
    if randomize or seed is None or seed == "" or (isinstance(seed, float) and math.isnan(seed)):
        return random.SystemRandom().randrange(0, MAX_SEED + 1)
    if float(seed) != int(float(seed)):
        raise ValueError(f"Seed must be a whole number, got {seed}.")
    return int(float(seed))


def save_png(image: Image.Image, path: Path, settings: GenerationSettings, extra: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG with the settings in tEXt chunks (``controlnext`` JSON and ``parameters`` text)."""
    info = PngImagePlugin.PngInfo()
    payload = dict(settings.to_json(), **(extra or {}))
    info.add_text(METADATA_KEY, json.dumps(payload, sort_keys=True))
    info.add_text("parameters", settings.parameters_text())
    info.add_text("Software", "controlnext")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_settings(source: str | Path | Image.Image) -> dict[str, Any]:
    """The ``controlnext`` metadata of a result PNG as a dict; ValueError when the file has none."""
    img = Image.open(source) if not isinstance(source, Image.Image) else source
    text = getattr(img, "text", {}).get(METADATA_KEY) if hasattr(img, "text") else img.info.get(METADATA_KEY)
    if not text:
        raise ValueError("This image carries no controlnext settings (only PNGs saved by the app do).")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"The image's controlnext settings are not valid JSON: {err}") from err


class GenerationStopped(RuntimeError):
    """A generation that ``should_stop`` ended between two denoising steps; nothing of it was saved."""

    def __init__(self, reason: str, done: int, total: int):
        self.reason, self.done, self.total = reason, done, total
        super().__init__(f"Stopped after {done} of {total} denoising steps: {reason}")


def family_check(pipe: Any, settings: GenerationSettings) -> bool:
    """Refuse settings the base family of ``pipe`` cannot take (one clear sentence); whether it takes a negative prompt.

    Transformer bases (SD3, Flux) make sizes in whole patches: multiples of the VAE factor times the patch (16 px
    for the published models). Flux.1-dev is guidance-distilled: one transformer call per step, with Guidance as its
    distilled guidance value; a negative prompt would need a second, true-CFG call per step, which the app does not
    make, so a negative prompt is refused rather than silently dropped.
    """
    from ..families import detect_family

    family = detect_family(pipe)
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * family.latent_patch
    if settings.width % multiple or settings.height % multiple:
        raise ValueError(
            f"{family.title} makes images in whole {multiple}-pixel patches (VAE factor x the transformer's patch); "
            f"got {settings.width}x{settings.height}: choose multiples of {multiple}."
        )
    if not family.cfg_batch and settings.negative_prompt.strip():
        raise ValueError(
            f"{family.title} is guidance-distilled and uses no negative prompt (Guidance sets its distilled guidance, "
            "3.5 is typical): clear the negative prompt."
        )
    return family.cfg_batch


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _next_index(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=0) + 1


def generate(
    pipe: Any,
    condition: Image.Image | None,
    settings: GenerationSettings,
    outputs: Path,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> tuple[list[Path], Path | None, float]:
    """Run one request: ``settings.batch_size`` images, image ``i`` with seed ``settings.seed + i``.

    Saves the condition (once) and every result under ``outputs/<date>/`` and returns (result paths, condition
    path, seconds). ``on_step(done, total)`` is called after every denoising step of every image. ``should_stop()``
    is asked before the first step and after every step; a reason (a sentence) instead of None ends the
    generation with :class:`GenerationStopped`, and nothing is saved.
    """
    import torch

    negative = family_check(pipe, settings)

    def check(done: int) -> None:
        reason = should_stop() if should_stop is not None else None
        if reason:
            raise GenerationStopped(reason, done, settings.steps)

    t0 = time.perf_counter()
    check(0)
    seeds = [(settings.seed + i) % (MAX_SEED + 1) for i in range(settings.batch_size)]
    # One generator per image: each result is reproducible alone from its recorded seed.
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    call: dict[str, Any] = dict(
        prompt=settings.prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        width=settings.width,
        height=settings.height,
        num_images_per_prompt=len(seeds),
        generator=generators,
    )
    if negative:
        call["negative_prompt"] = settings.negative_prompt or None
    if pipe.controlnext_modules:
        call.update(
            control_image=condition,
            controlnext_conditioning_scale=settings.control_scale,
            control_guidance_start=settings.control_start,
            control_guidance_end=settings.control_end,
        )
    if on_step is not None or should_stop is not None:

        def callback(_pipe, i, _t, kwargs):
            if on_step is not None:
                on_step(i + 1, settings.steps)
            check(i + 1)
            return {}

        call["callback_on_step_end"] = callback
    images = pipe(**call).images
    folder = outputs / time.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    index = _next_index(folder)
    cond_path = None
    extra: dict[str, Any] = {}
    if condition is not None:
        cond_path = folder / f"{index:05d}-condition.png"
        condition.save(cond_path, format="PNG")
        extra = {"condition_file": cond_path.name, "condition_sha256": _sha256(cond_path)}
    paths = []
    for i, (img, seed) in enumerate(zip(images, seeds)):
        own = GenerationSettings.from_json(dict(settings.to_json(), seed=seed, batch_size=1))
        path = folder / f"{index:05d}-{i}-{seed}.png"
        paths.append(save_png(img, path, own, dict(extra, batch_index=i)))
    return paths, cond_path, time.perf_counter() - t0
