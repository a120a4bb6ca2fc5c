"""Checks shared by the image and the video training loops: non-finite losses and weights, unusable precision.

A NaN or infinite loss stops the run before the step that produced it changes any weight or checkpoint, so the
last checkpoint written stays the last good one; weights that became non-finite anyway (an update that overflowed)
are refused before they are checkpointed or exported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

__all__ = ["NonFiniteError", "check_loss", "check_mixed_precision", "check_weights", "warn_non_finite"]

log = logging.getLogger("controlnext.train")


class NonFiniteError(FloatingPointError, ValueError):
    """Training produced a NaN or infinite value; nothing from that step was kept."""


def _resume_hint(last_checkpoint: str | None) -> str:
    if last_checkpoint:
        return f" The last good checkpoint is {last_checkpoint}; lower the learning rate and resume from it."
    return " No checkpoint was written yet; lower the learning rate and start again."


def check_loss(loss: torch.Tensor, step: int, last_checkpoint: str | None = None) -> None:
    """Raise :class:`NonFiniteError` if ``loss`` (of optimisation step ``step``, counted from 1) is NaN or inf."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(
            f"The training loss is {loss.detach().float().mean().item()} at step {step}: training stopped before "
            f"that step changed any weight." + _resume_hint(last_checkpoint)
        )


def _non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], int]:
    bad, total = [], 0
    for name, tensor in named:
        total += 1
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            bad.append(name)
    return bad, total


def check_weights(
    named: Iterable[tuple[str, torch.Tensor]],
    step: int,
    last_checkpoint: str | None = None,
    gather: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Raise :class:`NonFiniteError` if a trained tensor holds NaN or inf after step ``step`` (before it is saved).

    With sharded weights each process checks its own shards; ``gather`` (e.g. accelerate's ``gather_object``)
    collects every process's findings, so that all of them stop together.
    """
    bad, total = _non_finite(named)
    if gather is not None:
        bad = sorted(set(gather(bad)))
    if bad:
        raise NonFiniteError(
            f"{len(bad)} of {total} trained tensors hold NaN or inf values after step {step} (e.g. {bad[:3]}); they "
            "were not saved." + _resume_hint(last_checkpoint)
        )


def warn_non_finite(module: torch.nn.Module | None, what: str) -> list[str]:
    """Log a warning naming the tensors of ``module`` (loaded weights) that hold NaN or inf; returns their names."""
    if module is None:
        return []
    bad, total = _non_finite([*module.named_parameters(), *module.named_buffers()])
    if bad:
        log.warning(
            "%s: %d of %d tensors hold NaN or inf values (e.g. %s); training from them gives NaN weights.",
            what,
            len(bad),
            total,
            bad[:3],
        )
    return bad


def check_mixed_precision(accelerator) -> None:
    """fp16 autocast needs a GPU: on the CPU it ends in a dtype error deep inside torch, so refuse it up front."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "--mixed-precision fp16 needs a GPU, and this run is on the CPU; use --mixed-precision bf16 or no "
            "(if fp16 comes from your accelerate config, pass --mixed-precision no)."
        )
