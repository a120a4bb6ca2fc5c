"""Which parameters are trained: the whole control module plus UNet parameters chosen by name patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TrainableSet", "select_unet_parameters", "apply_trainable", "parameter_groups"]

# The published choices per family are `Family.trainable_patterns` (controlnext.families).


@dataclass
class TrainableSet:
    """Names and counts of the trained and frozen parameters."""

    unet_names: list[str]
    control_trainable: int
    unet_trainable: int
    unet_frozen: int

    def summary(self) -> str:
        total = self.control_trainable + self.unet_trainable
        return (
            f"trainable parameters: {total:,} (control module {self.control_trainable:,}; UNet {self.unet_trainable:,} "
            f"in {len(self.unet_names)} tensors); frozen UNet parameters: {self.unet_frozen:,}"
        )


def select_unet_parameters(unet: nn.Module, patterns: list[str]) -> list[str]:
    """UNet parameter names matched (``re.search``) by any pattern; ``[]`` or ``['none']`` selects nothing.

    A pattern that matches no parameter is an error (a typo would otherwise silently freeze the UNet).
    """
    if not patterns or patterns == ["none"]:
        return []
    compiled = []
    for pat in patterns:
        try:
            compiled.append(re.compile(pat))
        except re.error as err:
            raise ValueError(f"UNet parameter pattern {pat!r} is not a valid regular expression: {err}.") from None
    names = [n for n, _ in unet.named_parameters()]
    for pat, rx in zip(patterns, compiled):
        if not any(rx.search(n) for n in names):
            example = ", ".join(names[:3])
            raise ValueError(
                f"UNet parameter pattern {pat!r} matches no parameter of this UNet (names look like {example}, ...); "
                "use 'none' to train the control module only."
            )
    return [n for n in names if any(rx.search(n) for rx in compiled)]


def apply_trainable(unet: nn.Module, controlnext: nn.Module, unet_names: list[str]) -> TrainableSet:
    """Freeze the UNet except ``unet_names``; make the whole control module trainable. Returns the counts."""
    unet.requires_grad_(False)
    params = dict(unet.named_parameters())
    for name in unet_names:
        params[name].requires_grad_(True)
    controlnext.requires_grad_(True)
    chosen = set(unet_names)
    return TrainableSet(
        unet_names=list(unet_names),
        control_trainable=sum(p.numel() for p in controlnext.parameters()),
        unet_trainable=sum(p.numel() for n, p in params.items() if n in chosen),
        unet_frozen=sum(p.numel() for n, p in params.items() if n not in chosen),
    )


def parameter_groups(
    unet: nn.Module, controlnext: nn.Module, unet_names: list[str], control_lr: float, unet_lr: float
) -> list[dict]:
    """Optimizer parameter groups: the control module at ``control_lr``, the UNet subset at ``unet_lr``."""
    params = dict(unet.named_parameters())
    groups = [{"params": list(controlnext.parameters()), "lr": control_lr, "name": "control"}]
    if unet_names:
        groups.append({"params": [params[n] for n in unet_names], "lr": unet_lr, "name": "unet"})
    return groups


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names and bytes (to compare weights across ranks or runs bit for bit)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
