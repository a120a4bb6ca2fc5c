"""The benchmark rows: the base denoiser (UNet or transformer), ControlNeXt attached as the pipelines attach it,
diffusers' ControlNet for the family run as its pipeline runs it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..families import get_family
from ..inject import ControlNeXtAdapter, attach
from ..models.controlnext import ControlNeXtModel
from .models import _Inputs
from .presets import SCHEDULE_STEPS


class _Row:
    """One model combination. ``begin`` prepares a generation, ``step`` runs one denoising step's model calls."""

    name = "base"

    def __init__(self, unet: nn.Module, family: str):
        self.unet = unet
        self.family = family
        self.inputs: _Inputs | None = None
        self.control_cpu = 0.0  # CPU seconds spent in the control path during the current step
        self.call_unet: Callable[..., Any] = unet  # the UNet as called each step (a compiled wrapper when compiling)
        self.clock_hooks = True  # time the control path on the host (CPU runs; graph breaks under torch.compile)

    @property
    def added(self) -> list[nn.Module]:
        return []

    def trainable_params(self) -> int:
        return 0

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        self.inputs = inputs

    def compile(self, backend: str) -> None:
        """Call compiled wrappers from now on (after :meth:`begin`, so that the row's hooks are traced too)."""
        self.call_unet = torch.compile(self.unet, backend=backend)

    def uncompile(self) -> None:
        self.call_unet = self.unet

    def _unet(self, t: torch.Tensor, **extra: Any) -> Any:
        args, kw = self.inputs.call(t)
        return self.call_unet(*args, return_dict=False, **kw, **extra)

    def step(self, k: int) -> Any:
        return self._unet(self.inputs.timesteps[k % SCHEDULE_STEPS])

    def end(self) -> None:
        self.inputs = None


class _ControlNeXtRow(_Row):
    """The UNet with a ControlNeXt module attached as the pipelines attach it (cached prefix, de-duplication)."""

    def __init__(self, unet: nn.Module, family: str, name: str, module: ControlNeXtModel, plain: bool = False):
        super().__init__(unet, family)
        self.name = name
        self.module = module
        self.plain = plain  # the release's way: no cached prefix, the condition duplicated for guidance
        self.adapter: ControlNeXtAdapter | None = None

    @property
    def added(self) -> list[nn.Module]:
        return [self.module]

    def trainable_params(self) -> int:
        pattern = re.compile("|".join(get_family(self.family).trainable(self.module.config.injection_point)))
        unet_part = sum(p.numel() for n, p in self.unet.named_parameters() if pattern.search(n))
        return _count(self.module) + unet_part

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        super().begin(inputs, guidance)
        cond = inputs.condition.to(dtype=self.module.dtype)
        if self.plain and guidance:
            cond = torch.cat([cond] * 2)  # one row per UNet sample, as the release feeds its encoder
        # The condition is made at the output's size; transformers get no pixel factor, so the Flux grid is not read
        # from its rotary ids (a host read, impossible on the meta device).
        adapter = attach(
            self.unet, self.module, cond, cache_static=not self.plain,
            guidance=guidance and not self.plain, num_steps=SCHEDULE_STEPS,
            pixel_factor=None if inputs.transformer else 8,
        )  # fmt: skip
        if not self.plain:
            # Once per generation: the timestep-independent prefix, or a timestep-free module's whole output.
            slot = adapter.slots[0]
            if slot.module.config.use_timestep:
                slot.static()
            else:
                slot.features(slot.static(), inputs.timesteps[0])
        self.adapter = adapter
        self._clock = _bracket_hooks(self, adapter) if self.clock_hooks else []

    def step(self, k: int) -> Any:
        self.adapter.set_step(k % SCHEDULE_STEPS)
        return super().step(k)

    def end(self) -> None:
        if self.adapter is not None:
            for h in self._clock:
                h.remove()
            self.adapter.detach()
        self.adapter = None
        super().end()


class _ControlNetRow(_Row):
    """diffusers ControlNet, run as StableDiffusion(XL)ControlNetPipeline runs it each step."""

    name = "controlnet"

    def __init__(self, unet: nn.Module, family: str, controlnet: nn.Module):
        super().__init__(unet, family)
        self.controlnet = controlnet
        self.call_controlnet: Callable[..., Any] = controlnet
        self.image: torch.Tensor | None = None

    @property
    def added(self) -> list[nn.Module]:
        return [self.controlnet]

    def trainable_params(self) -> int:
        return _count(self.controlnet)

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        super().begin(inputs, guidance)
        # The pipeline duplicates the condition for the two guidance halves once, before the loop.
        self.image = torch.cat([inputs.condition] * 2) if guidance else inputs.condition

    def compile(self, backend: str) -> None:
        super().compile(backend)
        self.call_controlnet = torch.compile(self.controlnet, backend=backend)

    def uncompile(self) -> None:
        super().uncompile()
        self.call_controlnet = self.controlnet

    def step(self, k: int) -> Any:
        i = self.inputs
        t = i.timesteps[k % SCHEDULE_STEPS]
        kw = {"added_cond_kwargs": i.added} if i.added is not None else {}
        c0 = time.process_time()
        down, mid = self.call_controlnet(
            i.latents,
            t,
            encoder_hidden_states=i.text,
            controlnet_cond=self.image,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
            **kw,
        )
        self.control_cpu += time.process_time() - c0
        return self._unet(t, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def end(self) -> None:
        self.image = None
        super().end()


class _TransformerControlNetRow(_ControlNetRow):
    """diffusers' SD3 / Flux ControlNet, run as StableDiffusion3ControlNetPipeline / FluxControlNetPipeline run it
    each step: the ControlNet on the call's inputs and the condition latents (duplicated for guidance), then the
    transformer with its block residuals."""

    def begin(self, inputs: _Inputs, guidance: bool) -> None:
        _Row.begin(self, inputs, guidance)
        lat = inputs.control_latents
        self.image = torch.cat([lat] * inputs.latents.shape[0]) if lat.shape[0] != inputs.latents.shape[0] else lat
        # Union checkpoints (num_mode set) are called with a control mode per sample.
        union = getattr(self.controlnet, "union", False)
        self.mode = torch.zeros(self.image.shape[0], 1, dtype=torch.long, device=lat.device) if union else None

    def step(self, k: int) -> Any:
        t = self.inputs.timesteps[k % SCHEDULE_STEPS]
        _, kw = self.inputs.call(t)
        c0 = time.process_time()
        if self.family == "flux":
            double, single = self.call_controlnet(
                **kw, controlnet_cond=self.image, controlnet_mode=self.mode, conditioning_scale=1.0, return_dict=False
            )
            extra = {"controlnet_block_samples": double, "controlnet_single_block_samples": single}
        else:
            if self.controlnet.context_embedder is None:  # SD3.5's ControlNets take no text stream (their pipeline)
                kw = {**kw, "encoder_hidden_states": None}
            blocks = self.call_controlnet(**kw, controlnet_cond=self.image, conditioning_scale=1.0, return_dict=False)
            extra = {"block_controlnet_hidden_states": blocks[0]}
        self.control_cpu += time.process_time() - c0
        return self._unet(t, **extra)


def controlnet_row(unet: nn.Module, family: str, controlnet: nn.Module) -> _ControlNetRow:
    """The ControlNet row for ``family``: the UNet pipelines' way, or the transformer pipelines' way."""
    if get_family(family).denoiser == "transformer":
        return _TransformerControlNetRow(unet, family, controlnet)
    return _ControlNetRow(unet, family, controlnet)


def _bracket_hooks(row: _Row, adapter: ControlNeXtAdapter) -> list[torch.utils.hooks.RemovableHandle]:
    """Add the CPU time spent inside the adapter's hooks to ``row.control_cpu``.

    Each of the adapter's hook sites gets a clock-start hook placed before its hooks and a clock-stop hook after
    them, so the encoder (backbone pre-hook) and the Cross Normalization (injection hooks) are timed directly, not as
    the small difference of two long, noisy step times.
    """
    start = [0.0]

    def tick(*_: Any) -> None:
        start[0] = time.process_time()

    def tock(*_: Any) -> None:
        row.control_cpu += time.process_time() - start[0]

    return adapter.bracket(tick, tock)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight_bytes(modules: Sequence[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- measuring
