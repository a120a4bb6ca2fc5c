"""Attach ControlNeXt modules to a stock diffusers backbone with forward hooks (no forked UNet).

One :class:`ControlNeXtAdapter` per backbone holds the attached modules and their conditions. It registers:

* a forward pre-hook on the backbone, which reads the call's timestep and batch and runs each active encoder once
  for its unique conditions (the timestep-independent prefix is cached across steps);
* a hook at each injection point in use, which applies the module's control (Cross Normalization against that
  point's hidden state, or the zero-conv ablation) and adds it.

Injection points are :class:`controlnext.families.InjectionPoint` objects registered with the backbone's family
(SD1.5, SDXL, SVD, ...): which submodule, before or after it, which element of its input or output is the hidden
state. Tensors the backbone keeps (skips) are never modified in place, and detaching removes every hook, so the
backbone is left exactly as it was.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .families import Family, InjectionPoint, detect_family, family_of_variant, get_family
from .models.controlnext import ControlNeXtModel, ControlNeXtOutput, StaticFeatures

logger = logging.getLogger(__name__)

__all__ = ["ControlNeXtAdapter", "ControlSlot", "DenoisingRun", "FixedRun", "attach", "attached", "injection_channels"]


def injection_channels(backbone: nn.Module, point: str) -> int:
    """Channel count of the backbone's hidden state at the injection point called ``point``."""
    return detect_family(backbone).point(point).channels(backbone.config)


@runtime_checkable
class DenoisingRun(Protocol):
    """What the adapter reads about the denoising run at each backbone call.

    ``guidance``: the batch is [unconditional, conditional] halves (classifier-free guidance); ``num_steps``: the
    length of the schedule, for ``start``/``end`` windows. Pipelines pass a live view of their own state (both are
    only known inside the stock ``__call__``); everything else passes a :class:`FixedRun`.
    """

    @property
    def guidance(self) -> bool: ...

    @property
    def num_steps(self) -> int: ...


@dataclass(frozen=True)
class FixedRun:
    """A :class:`DenoisingRun` whose settings are known up front."""

    guidance: bool = False
    num_steps: int = 1


@dataclass
class ControlSlot:
    """One attached module with its condition and settings.

    ``condition``: (B_c, 3, H, W) or (B_c, F, 3, H, W) in the module's range (set it with :meth:`set_condition`,
    which takes [0, 1] pixels); B_c unique conditions serve
    the backbone batch (see :meth:`ControlNeXtAdapter.row_index`). ``scale`` multiplies the module's own scale.
    ``start``/``end``: fractions of the denoising schedule where the control is on (diffusers' ControlNet rule).
    """

    module: ControlNeXtModel
    condition: torch.Tensor | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    cache_static: bool = True
    _static: StaticFeatures | None = field(default=None, repr=False)
    # A timestep-free module's whole output, with the cached prefix it was computed from.
    _output: tuple[StaticFeatures, ControlNeXtOutput] | None = field(default=None, repr=False)

    def set_condition(self, condition: torch.Tensor | None) -> None:
        """Set the condition: pixels in [0, 1], (B_c, 3, H, W) or (B_c, F, 3, H, W); mapped to the module's range."""
        self.condition = None if condition is None else self.module.normalize_condition(condition)
        self._static = None

    def static(self) -> StaticFeatures:
        if self.condition is None:
            raise RuntimeError("A ControlNeXt module is attached but has no condition; call set_condition first.")
        if self._static is not None:
            return self._static
        static = self.module.encode_static(self.condition)
        # Cache only where no gradient has to flow through the prefix (inference); training recomputes it.
        if self.cache_static and not (torch.is_grad_enabled() and self.module.training):
            self._static = static
        return static

    def features(self, static: StaticFeatures, timestep: torch.Tensor | float | int) -> ControlNeXtOutput:
        """The encoder's output at ``timestep`` from ``static`` (:meth:`static`'s result); a timestep-free module's
        output is computed once per cached prefix."""
        if self._output is not None and self._output[0] is static:
            return self._output[1]
        out = self.module.forward_static(static, timestep)
        if not self.module.config.use_timestep and static is self._static:
            self._output = (static, out)
        return out


class ControlNeXtAdapter:
    """The hooks and state that add ControlNeXt control to one stock backbone. Create with :func:`attach`."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        run: DenoisingRun | None = None,
        pixel_factor: int | None = None,
        family: Family | None = None,
    ):
        self.backbone = backbone
        self.family = family or detect_family(backbone)
        self.slots: list[ControlSlot] = []
        self.run: DenoisingRun = run or FixedRun()
        # Pixels per latent (the VAE factor): when set, conditions are resized once to latent size x factor.
        self.pixel_factor = pixel_factor
        self.step: int = 0
        self._call_hook: torch.utils.hooks.RemovableHandle | None = None
        self._points: dict[str, tuple[InjectionPoint, torch.utils.hooks.RemovableHandle]] = {}
        self._pending: list[tuple[ControlSlot, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._index_cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._video = self.family.video
        # Where the sample and timestep sit when passed positionally (SD3 and Flux take the timestep fourth).
        params = list(inspect.signature(backbone.forward).parameters)
        self._arg_positions = tuple(params.index(n) if n in params else i for i, n in enumerate(self.family.call_args))

    @property
    def unet(self) -> nn.Module:
        """The backbone (named for the UNet families)."""
        return self.backbone

    # ------------------------------------------------------------------ attach / detach
    def add(self, module: ControlNeXtModel, **slot_kwargs) -> ControlSlot:
        """Attach one more module (several modules sum their controls)."""
        family = self.family
        variant = module.config.variant
        want = family_of_variant(variant)
        if want is not None and want.video != family.video:
            raise ValueError(
                f"ControlNeXt variant {variant!r} is for {want.name} {want.kind}s but this {family.kind} is "
                f"{family.name}: use a module made for {family.name} (image and video models take different modules)."
            )
        made_for = module.config.family
        if made_for is not None and made_for != family.name:
            other = get_family(made_for)
            raise ValueError(
                f"This ControlNeXt module (variant {variant!r}) was made for {other.title} ({other.name}) "
                f"{other.kind}s but this {family.kind} is {family.title} ({family.name}): use a module made for "
                f"{family.name}."
            )
        point = family.point(module.config.injection_point)
        if (point.layout == "tokens") != bool(module.config.token_patch):
            gives = "image tokens" if module.config.token_patch else "feature maps"
            raise ValueError(
                f"ControlNeXt module (variant {variant!r}) gives {gives} but this {family.name} {family.kind}'s hidden "
                f"state at {point.name} is {point.layout}: use a module made for {family.name}."
            )
        need = point.channels(self.backbone.config)
        if module.config.out_channels != need:
            made_for = f"; the module was made for {want.name} {want.kind}s." if want not in (None, family) else "."
            raise ValueError(
                f"ControlNeXt module (variant {variant!r}, {module.config.out_channels} output channels, injected "
                f"{point.name}) does not fit this {family.name} {family.kind}, whose hidden state there has {need} "
                "channels" + made_for
            )
        slot = ControlSlot(module=module, **slot_kwargs)
        self.slots.append(slot)
        self._register(point)
        return slot

    def _register(self, point: InjectionPoint) -> None:
        if self._call_hook is None:
            self._call_hook = self.backbone.register_forward_pre_hook(self._on_call, with_kwargs=True)
        if point.name not in self._points:
            handle = point.hook(self.backbone, lambda hidden, name=point.name: self._controlled(name, hidden))
            self._points[point.name] = (point, handle)

    @property
    def points(self) -> list[InjectionPoint]:
        """The injection points in use."""
        return [p for p, _ in self._points.values()]

    def bracket(
        self, before: Callable[..., None], after: Callable[..., None]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that run ``before``/``after`` around each of the adapter's hooks (the benchmark's clock)."""
        if self._call_hook is None:
            return []
        handles = [
            self.backbone.register_forward_pre_hook(before, prepend=True),
            self.backbone.register_forward_pre_hook(after),
        ]
        for point in self.points:
            handles += point.bracket(self.backbone, before, after)
        return handles

    def detach(self) -> None:
        """Remove every hook; the backbone is exactly as before :func:`attach`."""
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = None
        for _, handle in self._points.values():
            handle.remove()
        self._points.clear()
        self._pending.clear()
        self.slots.clear()

    # ------------------------------------------------------------------ schedule window
    def set_step(self, step: int) -> None:
        """Tell the adapter which denoising step (0-based) the next UNet call belongs to."""
        self.step = step

    def _active(self, slot: ControlSlot) -> bool:
        n = max(int(self.run.num_steps or 1), 1)
        return not (self.step / n < slot.start or (self.step + 1) / n > slot.end)

    # ------------------------------------------------------------------ batch mapping
    def row_index(
        self, rows: int, batch: int, frames: int = 1, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Map each of ``batch`` UNet samples to one of ``rows`` conditions, and give per-sample weights.

        Under guidance the batch is [uncond, cond] halves; inside a half, conditions are assigned prompt-major
        (``rows`` = 1, the number of prompts, or one per image). Video samples expand to ``frames`` rows each.
        Returns ``(index or None, weight or None)``; ``weight`` is 0 on the unconditional half and is used for
        modules published without unconditional control (the SVD releases). Cached, so steps allocate nothing.
        """
        guidance = bool(self.run.guidance)
        key = (rows, batch, frames, guidance, dtype)
        if key in self._index_cache:
            return self._index_cache[key]
        half = batch // 2 if guidance else batch
        if (guidance and batch % 2) or half % rows:
            raise ValueError(
                f"{rows} control conditions cannot be spread over a UNet batch of {batch}"
                + (" (two guidance halves)" if guidance else "")
                + ": give one condition, one per prompt, or one per generated image."
            )
        device = self.slots[0].module.device
        one = torch.arange(half, device=device) // (half // rows)
        index = torch.cat([one, one]) if guidance else one
        weight = None
        if guidance:
            weight = torch.cat(
                [torch.zeros(half, device=device, dtype=dtype), torch.ones(half, device=device, dtype=dtype)]
            )
            weight = weight.repeat_interleave(frames)  # one per backbone sample; shaped to the hidden state when used
        if rows == batch and not guidance:
            index = None
        elif frames > 1:
            index = (index[:, None] * frames + torch.arange(frames, device=device)).reshape(-1)
        self._index_cache[key] = (index, weight)
        return index, weight

    # ------------------------------------------------------------------ hooks
    def _on_call(self, backbone, args, kwargs):
        self._pending.clear()
        (sample_name, timestep_name), (sample_pos, timestep_pos) = self.family.call_args, self._arg_positions
        sample = kwargs[sample_name] if sample_name in kwargs else args[sample_pos]
        timestep = kwargs[timestep_name] if timestep_name in kwargs else args[timestep_pos]
        if self.family.timestep_scale != 1:
            timestep = timestep * self.family.timestep_scale  # the encoder always sees t in [0, 1000]
        batch = sample.shape[0]
        frames = sample.shape[1] if self._video else 1
        size = None
        for slot in self.slots:
            if slot.condition is None or slot.scale == 0 or not self._active(slot):
                continue
            if self.pixel_factor:
                if size is None:
                    size = tuple(d * self.pixel_factor for d in self.family.latent_grid(sample, kwargs))
                self._fit_condition(slot, size)
            static = slot.static()
            rows = static.hidden.shape[0] // static.frames
            if static.frames != frames:
                raise ValueError(f"The control has {static.frames} frames but the UNet is denoising {frames} frames.")
            index, weight = self.row_index(rows, batch, frames, slot.module.dtype)
            t = timestep
            if torch.is_tensor(t) and t.numel() > 1 and t.numel() != rows:
                # One timestep per UNet sample: give each condition row the timestep of a sample that uses it.
                sample_index = index if frames == 1 else index[::frames] // frames
                t = t.reshape(-1).new_empty(rows).scatter_(0, sample_index, t.reshape(-1))
            out = slot.features(static, t)
            scale = out.scale * slot.scale
            if weight is not None and not slot.module.config.uncond_control:
                # The raw scale is zeroed on the unconditional half, then the scale rule applies (the SVD releases).
                zeroed = slot.module.zeroed_scale() * slot.scale
                scale = scale * weight if zeroed == 0 else scale * weight + zeroed * (1 - weight)
            self._pending.append((slot, out.sample, scale, index))

    @staticmethod
    def _fit_condition(slot: ControlSlot, size: tuple[int, int]) -> None:
        """Resize a slot's condition to the pixel size of the latents being denoised (once per generation)."""
        cond = slot.condition
        if tuple(cond.shape[-2:]) == size:
            return
        h, w = cond.shape[-2:]
        if abs((w / h) / (size[1] / size[0]) - 1) > 0.01:
            logger.warning("Condition of %dx%d (WxH) is stretched to the output's %dx%d.", w, h, size[1], size[0])
        flat = cond.reshape(-1, *cond.shape[-3:])
        flat = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
        slot.condition = flat.reshape(*cond.shape[:-2], *size)
        slot._static = None

    def _controlled(self, point: str, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden
        for slot, feats, scale, index in self._pending:
            if slot.module.config.injection_point == point:
                if scale.dim():  # one scale per sample (guidance halves): broadcast over the sample's dims
                    scale = scale.reshape(-1, *(1,) * (hidden.dim() - 1))
                out = out + slot.module.align(feats, hidden, index) * scale.to(hidden.dtype)
        return out


def attach(
    backbone: nn.Module,
    modules: ControlNeXtModel | Sequence[ControlNeXtModel],
    conditions: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    scales: float | Sequence[float] = 1.0,
    *,
    starts: float | Sequence[float] = 0.0,
    ends: float | Sequence[float] = 1.0,
    guidance: bool = False,
    num_steps: int = 1,
    run: DenoisingRun | None = None,
    pixel_factor: int | None = None,
    cache_static: bool = True,
) -> ControlNeXtAdapter:
    """Attach one or more ControlNeXt modules to ``backbone``; returns the adapter (call ``.detach()`` to undo).

    Args:
        conditions: one tensor per module, pixels in [0, 1] (mapped to each module's range here); may also be set
            later through each slot's ``set_condition`` (the video pipeline does so per window).
        scales, starts, ends: per module (or one for all): the control scale, and the fraction of the schedule
            where the control is on.
        guidance, num_steps: the batch holds [unconditional, conditional] halves; the schedule length. Or ``run``:
            a :class:`DenoisingRun` read at each call (what the pipelines pass), instead of these two.
        pixel_factor: pixels per latent; when given, conditions are resized once to the latents' pixel size.
        cache_static: cache the encoder's timestep-free prefix across steps (inference).
    """
    if run is not None and (guidance or num_steps != 1):
        raise ValueError("Give either run= or guidance=/num_steps= to attach, not both.")
    mods = [modules] if isinstance(modules, ControlNeXtModel) else list(modules)
    n = len(mods)
    columns = [_per_module(v, n, name) for v, name in
               ((conditions, "conditions"), (scales, "scales"), (starts, "starts"), (ends, "ends"))]  # fmt: skip
    adapter = ControlNeXtAdapter(backbone, run=run or FixedRun(guidance, num_steps), pixel_factor=pixel_factor)
    try:
        for m, c, s, a, b in zip(mods, *columns):
            slot = adapter.add(m, scale=float(s), start=float(a), end=float(b), cache_static=cache_static)
            if c is not None:
                slot.set_condition(c)
    except Exception:
        adapter.detach()
        raise
    return adapter


def _per_module(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (int, float, torch.Tensor)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"Got {len(value)} {name} for {n} ControlNeXt modules; give one per module.")
    return value


@contextmanager
def attached(backbone: nn.Module, modules, conditions=None, scales=1.0, **kwargs):
    """Context manager form of :func:`attach` (same arguments): the hooks are removed on exit, even on error."""
    adapter = attach(backbone, modules, conditions, scales, **kwargs)
    try:
        yield adapter
    finally:
        adapter.detach()
