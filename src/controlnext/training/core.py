"""What the image and the video trainers share: per-sample seeded randomness and the backbone + control wrapper.

Every random number of a training step is drawn from a CPU generator seeded by (seed, step, micro-step, position in
the global batch). None depends on RNG history, so a resumed run, or the same global batch split over another number
of processes, replays the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..families import detect_family
from ..inject import attach
from ..models.controlnext import ControlNeXtModel

__all__ = ["ControlledBackbone", "randn", "sample_generators"]


def sample_generators(seed: int, step: int, micro: int, first_position: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, step, micro-step, position in the global batch)."""
    gens = []
    for i in range(count):
        state = np.random.SeedSequence([seed, step, micro, first_position + i]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def randn(shape: tuple[int, ...], gens: list[torch.Generator], device, dtype) -> torch.Tensor:
    """A (len(gens), *shape) normal sample, row i from ``gens[i]``, on ``device`` in ``dtype``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)


class ControlledBackbone(nn.Module):
    """A stock backbone + its control module as one module (one DDP/FSDP wrapper); the module is attached per call.

    The backbone is registered under its family's component name (``unet``, or ``transformer`` for DiT families),
    so checkpoint keys read ``unet.*`` / ``controlnext.*``. ``forward(*args, condition=..., **kwargs)`` calls the
    backbone with the control attached and returns its first output.
    """

    def __init__(self, backbone: nn.Module, controlnext: ControlNeXtModel):
        super().__init__()
        self._denoiser = detect_family(backbone).denoiser
        self.add_module(self._denoiser, backbone)
        self.controlnext = controlnext

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self._denoiser)

    def forward(self, *args, condition: torch.Tensor, **kwargs) -> torch.Tensor:
        self.release()
        # cache_static=False: the encoder's timestep-free prefix is recomputed so that gradients reach it.
        adapter = attach(self.backbone, self.controlnext, conditions=condition, cache_static=False)
        try:
            return self.backbone(*args, return_dict=False, **kwargs)[0]
        finally:
            # A transformer with gradient checkpointing re-runs whole blocks, the hooked one included, in the
            # backward pass: its hooks stay until the next call (or release()) so that the recomputation matches.
            if torch.is_grad_enabled() and getattr(self.backbone, "gradient_checkpointing", False):
                self.__dict__["_held"] = adapter
            else:
                adapter.detach()

    def release(self) -> None:
        """Remove the hooks a checkpointed call left for its backward pass (before using the backbone elsewhere)."""
        adapter = self.__dict__.pop("_held", None)
        if adapter is not None:
            adapter.detach()
