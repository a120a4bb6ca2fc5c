"""The benchmark rows: the base UNet, ControlNeXt attached as the pipelines attach it, diffusers' ControlNet."""

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
        i = self.inputs
        kw = {"added_cond_kwargs": i.added} if i.added is not None else {}
        return self.call_unet(i.latents, t, encoder_hidden_states=i.text, return_dict=False, **kw, **extra)

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
        adapter = attach(
            self.unet, self.module, cond, cache_static=not self.plain,
            guidance=guidance and not self.plain, num_steps=SCHEDULE_STEPS, pixel_factor=8,
        )  # fmt: skip
        if not self.plain:
            adapter.slots[0].static()  # the timestep-independent prefix: once per generation
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
