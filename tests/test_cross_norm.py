"""Cross Normalization against an independent float64 reference with hand-computed statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnext import cross_normalize


def reference(c: np.ndarray, h: np.ndarray, eps: float, pool_first: bool) -> np.ndarray:
    """The published formula, sample by sample, with explicit sums (unbiased std) and block-mean pooling."""

    def pool(x, size):  # exact adaptive average pooling for integer factors
        fh, fw = x.shape[1] // size[0], x.shape[2] // size[1]
        return x.reshape(x.shape[0], size[0], fh, size[1], fw).mean(axis=(2, 4))

    def stats(x):
        n = x.size
        mean = x.sum() / n
        std = np.sqrt(((x - mean) ** 2).sum() / (n - 1))
        return mean, std

    out = []
    for cs, hs in zip(c, h):
        if pool_first:
            cs = pool(cs, hs.shape[1:])
        cm, csd = stats(cs)
        hm, hsd = stats(hs)
        y = (cs - cm) * (hsd / (csd + eps)) + hm
        if not pool_first:
            y = pool(y, hs.shape[1:])
        out.append(y)
    return np.stack(out)


@pytest.mark.parametrize("pool_first,eps", [(True, 1e-12), (False, 1e-12), (False, 1e-5)])
def test_matches_float64_reference(pool_first, eps):
    rng = np.random.default_rng(0)
    c = rng.normal(3.0, 5.0, size=(3, 8, 16, 16))
    h = rng.normal(-1.0, 0.3, size=(3, 8, 4, 4))
    ours = cross_normalize(torch.from_numpy(c), torch.from_numpy(h), eps=eps, pool_first=pool_first)
    np.testing.assert_allclose(ours.numpy(), reference(c, h, eps, pool_first), rtol=1e-10, atol=1e-12)


def test_output_statistics_equal_hidden_when_sizes_match():
    torch.manual_seed(0)
    c = torch.randn(4, 16, 8, 8, dtype=torch.float64) * 7 + 2
    h = torch.randn(4, 16, 8, 8, dtype=torch.float64) * 0.5 - 3
    out = cross_normalize(c, h)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), h.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), h.std(dim=(1, 2, 3)))


@pytest.mark.parametrize("pool_first", [True, False])
def test_index_expansion_equals_duplicated_computation(pool_first):
    torch.manual_seed(1)
    c = torch.randn(2, 8, 16, 16)
    h = torch.randn(4, 8, 8, 8)
    index = torch.tensor([0, 1, 0, 1])
    deduped = cross_normalize(c, h, pool_first=pool_first, index=index)
    duplicated = cross_normalize(c[index], h, pool_first=pool_first)
    torch.testing.assert_close(deduped, duplicated, rtol=1e-5, atol=1e-6)


def test_float32_matches_float64():
    torch.manual_seed(2)
    c = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    h = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    ref = cross_normalize(c, h)
    torch.testing.assert_close(cross_normalize(c.float(), h.float()).double(), ref, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        cross_normalize(torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        cross_normalize(torch.randn(2, 8, 8, 8), torch.randn(3, 8, 8, 8))
