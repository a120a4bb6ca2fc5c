"""Cross Normalization: align control features to the statistics of the backbone hidden state they are added to.

Two layouts: feature maps (N, C, H, W) for UNets, and tokens (N, L, D) for transformers (SD3, Flux).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # adaptive_avg_pool2d is a no-op copy when the size already matches; skip it to save the copy.
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def resize_like(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``x`` at ``hidden``'s size: feature maps are average-pooled; token sequences must already have its length.

    Tokens carry no grid, so they are never resampled here: the condition is resized in pixel space instead (the
    pipelines do it, to the output's size), which makes the encoder's token grid the backbone's.
    """
    if x.dim() == 4:
        return pool_to(x, hidden.shape[-2:])
    if x.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"The control has {x.shape[1]} tokens but the transformer's hidden state has {hidden.shape[1]}: give the "
            "condition at the output's pixel size (latent grid x VAE factor), or pass it through a pipeline, which "
            "resizes it."
        )
    return x


def cross_normalize(
    control: torch.Tensor,
    hidden: torch.Tensor,
    *,
    eps: float = 1e-12,
    pool_first: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``c'``: ``control`` normalised to ``hidden``'s per-sample mean and std, at ``hidden``'s size.

    ``c' = (c - mean(c)) * std(h) / (std(c) + eps) + mean(h)``, statistics per sample over all of (C, H, W) for
    feature maps (N, C, H, W), or over all tokens and channels (L, D) for token sequences (N, L, D); std unbiased,
    as in the published models. ``pool_first`` pools ``c`` to ``h``'s size before normalising (published ``sd15``
    and ``sd15-training``); otherwise it normalises first, then pools (``sdxl``, ``svd``, ``svd-v2``). Token
    sequences must have ``hidden``'s length (see :func:`resize_like`), so both orders agree for them.

    ``index`` maps each row of ``hidden`` to a row of ``control`` (``hidden[i]`` uses ``control[index[i]]``). It
    lets one encoded condition serve several backbone samples (classifier-free guidance halves, images per prompt)
    without re-encoding: control statistics are computed once per unique row, then expanded. ``None`` means
    ``control`` already has one row per hidden row.

    The result has ``hidden``'s dtype and device; it is not scaled (callers multiply by the variant's scale).
    """
    if control.dim() != hidden.dim() or control.dim() not in (3, 4):
        raise ValueError(
            f"cross_normalize expects two 4-D (N, C, H, W) or two 3-D (N, tokens, channels) tensors, got control "
            f"{tuple(control.shape)} and hidden {tuple(hidden.shape)}."
        )
    channel = 1 if control.dim() == 4 else 2
    if control.shape[channel] != hidden.shape[channel]:
        raise ValueError(
            f"Control features have {control.shape[channel]} channels but the backbone's hidden state at the "
            f"injection point has {hidden.shape[channel]}: this ControlNeXt module was made for a different backbone "
            "or injection point."
        )
    n_rows = control.shape[0] if index is None else index.shape[0]
    if n_rows != hidden.shape[0]:
        raise ValueError(
            f"Control batch ({n_rows}) does not match the backbone batch ({hidden.shape[0]}) at the injection point."
        )
    control = control.to(dtype=hidden.dtype, device=hidden.device)
    if pool_first:
        control = resize_like(control, hidden)  # statistics of the pooled features (published sd15 order)
    dims = tuple(range(1, control.dim()))
    c_mean = control.mean(dim=dims, keepdim=True)
    denom = control.std(dim=dims, keepdim=True) + eps
    # Average pooling is linear and the normalisation is affine per sample, so pooling the centred features before
    # scaling equals the published normalise-then-pool order, at the cost of one pooled tensor per unique condition.
    centred = resize_like(control - c_mean, hidden)
    if index is not None:
        centred = centred.index_select(0, index)
        denom = denom.index_select(0, index)
    h_mean = hidden.mean(dim=dims, keepdim=True)
    h_std = hidden.std(dim=dims, keepdim=True)
    return centred * (h_std / denom) + h_mean
