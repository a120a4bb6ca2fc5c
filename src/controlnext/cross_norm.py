"""Cross Normalization: align control features to the statistics of the UNet hidden state they are added to."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # adaptive_avg_pool2d is a no-op copy when the size already matches; skip it to save the copy.
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def cross_normalize(
    control: torch.Tensor,
    hidden: torch.Tensor,
    *,
    eps: float = 1e-12,
    pool_first: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``c'``: ``control`` normalised to ``hidden``'s per-sample mean and std, at ``hidden``'s spatial size.

    ``c' = (c - mean(c)) * std(h) / (std(c) + eps) + mean(h)``, statistics per sample over (C, H, W), std unbiased,
    as in the published models. ``pool_first`` pools ``c`` to ``h``'s size before normalising (published ``sd15``
    and ``sd15-training``); otherwise it normalises first, then pools (``sdxl``, ``svd``, ``svd-v2``).

    ``index`` maps each row of ``hidden`` to a row of ``control`` (``hidden[i]`` uses ``control[index[i]]``). It
    lets one encoded condition serve several UNet samples (classifier-free guidance halves, images per prompt)
    without re-encoding: control statistics are computed once per unique row, then expanded. ``None`` means
    ``control`` already has one row per hidden row.

    The result has ``hidden``'s dtype and device; it is not scaled (callers multiply by the variant's scale).
    """
    if control.dim() != 4 or hidden.dim() != 4:
        raise ValueError(
            f"cross_normalize expects 4-D (N, C, H, W) tensors, got control {tuple(control.shape)} "
            f"and hidden {tuple(hidden.shape)}."
        )
    if control.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"Control features have {control.shape[1]} channels but the UNet hidden state at the injection point has "
            f"{hidden.shape[1]}: this ControlNeXt module was made for a different UNet or injection point."
        )
    n_rows = control.shape[0] if index is None else index.shape[0]
    if n_rows != hidden.shape[0]:
        raise ValueError(
            f"Control batch ({n_rows}) does not match the UNet batch ({hidden.shape[0]}) at the injection point."
        )
    control = control.to(dtype=hidden.dtype, device=hidden.device)
    size = hidden.shape[-2:]
    if pool_first:
        control = pool_to(control, size)  # statistics of the pooled features (published sd15 order)
    dims = (1, 2, 3)
    c_mean = control.mean(dim=dims, keepdim=True)
    denom = control.std(dim=dims, keepdim=True) + eps
    # Average pooling is linear and the normalisation is affine per sample, so pooling the centred features before
    # scaling equals the published normalise-then-pool order, at the cost of one pooled tensor per unique condition.
    centred = pool_to(control - c_mean, size)
    if index is not None:
        centred = centred.index_select(0, index)
        denom = denom.index_select(0, index)
    h_mean = hidden.mean(dim=dims, keepdim=True)
    h_std = hidden.std(dim=dims, keepdim=True)
    return centred * (h_std / denom) + h_mean
