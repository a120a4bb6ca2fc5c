"""Attach ControlNeXt modules to a stock diffusers UNet with forward hooks (no forked UNet).

One :class:`ControlNeXtAdapter` per UNet holds the attached modules and their conditions. It registers:

* a forward pre-hook on the UNet, which reads the call's timestep and batch and runs each active encoder once for
  its unique conditions (the timestep-independent prefix is cached across steps);
* a hook at each injection point in use, which cross-normalises the features against that point's hidden state and
  adds them:

  - ``before_down_block_0``: pre-hook on ``down_blocks[0]``; ``conv_in``'s output was already stored as the first
    skip tensor, so the skip stays un-controlled (published SDXL semantics);
  - ``after_down_block_0``: hook on ``down_blocks[0]``'s output; only the running hidden state changes, the skip
    tensors the block returned are kept as they were (published SD1.5-training / SVD-v2 semantics);
  - ``after_mid_block``: hook on ``mid_block``'s output, before the up blocks.

Tensors the UNet keeps are never modified in place, and detaching removes every hook, so the UNet is left exactly
as it was. Works with ``UNet2DConditionModel`` (SD1.5, SDXL) and ``UNetSpatioTemporalConditionModel`` (SVD).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .cross_norm import cross_normalize, pool_to
from .models.controlnext import ControlNeXtModel, StaticFeatures
from .models.variants import AFTER_DOWN0, AFTER_MID, BEFORE_DOWN0, VARIANT_FAMILY

logger = logging.getLogger(__name__)

__all__ = ["ControlNeXtAdapter", "ControlSlot", "attach", "unet_family", "injection_channels"]


def unet_family(unet: nn.Module) -> str:
    """'svd' for spatio-temporal UNets, 'sdxl' for UNets with SDXL's added text/time embedding, else 'sd15'."""
    if type(unet).__name__.startswith("UNetSpatioTemporal"):
        return "svd"
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd15"


def injection_channels(unet: nn.Module, point: str) -> int:
    """Channel count of the UNet hidden state at an injection point."""
    chans = unet.config.block_out_channels
    return chans[-1] if point == AFTER_MID else chans[0]


@dataclass
class ControlSlot:
    """One attached module with its condition and settings.

    ``condition``: (B_c, 3, H, W) or (B_c, F, 3, H, W) in the module's range (set it with :meth:`set_condition`,
    which takes [0, 1] pixels); B_c unique conditions serve
    the UNet batch (see :meth:`ControlNeXtAdapter.row_index`). ``scale`` multiplies the module's own scale.
    ``start``/``end``: fractions of the denoising schedule where the control is on (diffusers' ControlNet rule).
    """

    module: ControlNeXtModel
    condition: torch.Tensor | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    cache_static: bool = True
    _static: StaticFeatures | None = field(default=None, repr=False)

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


class ControlNeXtAdapter:
    """The hooks and state that add ControlNeXt control to one stock UNet. Create with :func:`attach`."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.slots: list[ControlSlot] = []
        # True (or a callable returning it) when the UNet batch is [unconditional, conditional] halves.
        self.guidance: bool | Callable[[], bool] = False
        # Pixels per latent (the VAE factor): when set, conditions are resized once to latent size x factor.
        self.pixel_factor: int | None = None
        self.step: int = 0
        self.num_steps: Callable[[], int] | int = 1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: list[tuple[ControlSlot, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._index_cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._video = unet_family(unet) == "svd"

    # ------------------------------------------------------------------ attach / detach
    def add(self, module: ControlNeXtModel, **slot_kwargs) -> ControlSlot:
        """Attach one more module (several modules sum their controls)."""
        family = unet_family(self.unet)
        variant = module.config.variant
        want = VARIANT_FAMILY.get(variant)
        point = module.config.injection_point
        need = injection_channels(self.unet, point)
        if module.config.out_channels != need:
            raise ValueError(
                f"ControlNeXt module (variant {variant!r}, {module.config.out_channels} output channels, injected "
                f"{point}) does not fit this {family} UNet, whose hidden state there has {need} channels"
                + (f"; the module was published for {want} UNets." if want and want != family else ".")
            )
        if want is not None and (want == "svd") != (family == "svd"):
            raise ValueError(
                f"ControlNeXt variant {variant!r} is for {want} UNets but this UNet is {family}: use a module made for "
                f"{family} (image and video UNets take different control modules)."
            )
        slot = ControlSlot(module=module, **slot_kwargs)
        self.slots.append(slot)
        self._register(point)
        return slot

    def _register(self, point: str) -> None:
        if not self._handles:
            self._handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        if any(getattr(h, "_point", None) == point for h in self._handles):
            return
        if point == BEFORE_DOWN0:
            h = self.unet.down_blocks[0].register_forward_pre_hook(self._before_down0, with_kwargs=True)
        elif point == AFTER_DOWN0:
            h = self.unet.down_blocks[0].register_forward_hook(self._after_down0)
        else:
            h = self.unet.mid_block.register_forward_hook(self._after_mid)
        h._point = point
        self._handles.append(h)

    def detach(self) -> None:
        """Remove every hook; the UNet is exactly as before :func:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        self.slots.clear()

    # ------------------------------------------------------------------ schedule window
    def set_step(self, step: int) -> None:
        """Tell the adapter which denoising step (0-based) the next UNet call belongs to."""
        self.step = step

    def _active(self, slot: ControlSlot) -> bool:
        n = self.num_steps() if callable(self.num_steps) else self.num_steps
        n = max(int(n or 1), 1)
        return not (self.step / n < slot.start or (self.step + 1) / n > slot.end)

    # ------------------------------------------------------------------ batch mapping
    def row_index(
        self, rows: int, batch: int, frames: int = 1, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Map each of ``batch`` UNet samples to one of ``rows`` conditions, and give per-sample weights.

        Under guidance the batch is [uncond, cond] halves; inside a half, conditions are assigned prompt-major
        (``rows`` = 1, the number of prompts, or one per image). Video samples expand to ``frames`` rows each.
        Returns ``(index or None, weight or None)``; ``weight`` is 0 on the unconditional half and is used for
        modules published without unconditional control (SVD v2). Cached, so steps allocate nothing.
        """
        guidance = bool(self.guidance() if callable(self.guidance) else self.guidance)
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
            weight = weight.repeat_interleave(frames)[:, None, None, None]
        if rows == batch and not guidance:
            index = None
        elif frames > 1:
            index = (index[:, None] * frames + torch.arange(frames, device=device)).reshape(-1)
        self._index_cache[key] = (index, weight)
        return index, weight

    # ------------------------------------------------------------------ hooks
    def _on_unet_call(self, unet, args, kwargs):
        self._pending.clear()
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        batch = sample.shape[0]
        frames = sample.shape[1] if self._video else 1
        for slot in self.slots:
            if slot.condition is None or slot.scale == 0 or not self._active(slot):
                continue
            if self.pixel_factor:
                self._fit_condition(slot, tuple(d * self.pixel_factor for d in sample.shape[-2:]))
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
            out = slot.module.forward_static(static, t)
            scale = out.scale * slot.scale
            if weight is not None and not slot.module.config.uncond_control:
                scale = scale * weight
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
            cfg = slot.module.config
            if cfg.injection_point != point:
                continue
            if cfg.normalization == "zero_conv":
                c = pool_to(slot.module.zero_conv(feats), hidden.shape[-2:]).to(hidden.dtype)
                c = c if index is None else c.index_select(0, index)
            else:
                c = cross_normalize(feats, hidden, eps=cfg.norm_eps, pool_first=cfg.pool_first, index=index)
            out = out + c * scale.to(hidden.dtype)
        return out

    def _before_down0(self, module, args, kwargs):
        if not self._pending:
            return None
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=self._controlled(BEFORE_DOWN0, kwargs["hidden_states"]))
        else:
            args = (self._controlled(BEFORE_DOWN0, args[0]), *args[1:])
        return args, kwargs

    def _after_down0(self, module, args, output):
        if not self._pending:
            return None
        hidden, skips = output
        return self._controlled(AFTER_DOWN0, hidden), skips

    def _after_mid(self, module, args, output):
        if not self._pending:
            return None
        if isinstance(output, tuple):
            return (self._controlled(AFTER_MID, output[0]), *output[1:])
        return self._controlled(AFTER_MID, output)


def attach(
    unet: nn.Module,
    modules: ControlNeXtModel | Sequence[ControlNeXtModel],
    conditions: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scales: float | Sequence[float] = 1.0,
    *,
    cache_static: bool = True,
) -> ControlNeXtAdapter:
    """Attach one or more ControlNeXt modules to ``unet``; returns the adapter (call ``.detach()`` to undo).

    ``conditions`` (one tensor per module, in [0, 1]; mapped to each module's range here) and ``scales`` may be
    given now or later through each slot's ``set_condition``/``scale``.
    """
    mods = [modules] if isinstance(modules, ControlNeXtModel) else list(modules)
    conds = _per_module(conditions, len(mods), "conditions")
    scl = _per_module(scales, len(mods), "scales")
    adapter = ControlNeXtAdapter(unet)
    try:
        for m, c, s in zip(mods, conds, scl):
            slot = adapter.add(m, scale=float(s), cache_static=cache_static)
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
def attached(unet: nn.Module, modules, conditions=None, scales=1.0, **kwargs):
    """Context manager form of :func:`attach`: the hooks are removed on exit, even on error."""
    adapter = attach(unet, modules, conditions, scales, **kwargs)
    try:
        yield adapter
    finally:
        adapter.detach()
