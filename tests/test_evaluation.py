"""The control-fidelity metrics on hand-made masks and edge maps, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from controlnext.shapes import canny_edges, render_sample
from controlnext.shapes.metrics import control_fidelity, edge_f1, foreground_mask, mask_iou


def _square(size=32, y0=8, x0=8, side=10):
    m = np.zeros((size, size), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_mask_iou_hand_made():
    a = _square(side=10)  # 100 px
    b = _square(x0=13, side=10)  # overlaps a in a 10x5 strip
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    # Condition images (uint8, 3 channels, white on black) are binarised at half range.
    img = np.repeat(np.where(b, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    assert mask_iou(a, img) == pytest.approx(50 / 150)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((8, 8), bool))


def _brute_f1(pred, ref, tol):
    """Independent reference: O(N*M) nearest distances."""
    p, r = np.argwhere(pred), np.argwhere(ref)
    d = np.sqrt(((p[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    prec, rec = (d.min(1) <= tol).mean(), (d.min(0) <= tol).mean()
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def test_edge_f1_hand_made():
    ref = np.zeros((32, 32), bool)
    ref[10, 5:25] = True  # a 20 px horizontal line
    shifted = np.roll(ref, 2, axis=0)  # 2 px away: matched at tolerance 2, not at 1
    assert edge_f1(shifted, ref, tolerance=2) == 1.0
    assert edge_f1(shifted, ref, tolerance=1) == 0.0
    half = np.zeros_like(ref)
    half[10, 5:15] = True  # precision 1, recall 10/20 -> F1 = 2/3 (at tolerance 0 no end pixel gets matched)
    assert edge_f1(half, ref, tolerance=0) == pytest.approx(2 / 3)
    assert edge_f1(ref, ref, tolerance=0) == 1.0
    assert edge_f1(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    assert edge_f1(np.zeros_like(ref), ref) == 0.0 and edge_f1(ref, np.zeros_like(ref)) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(ref, ref, tolerance=-1)


def test_edge_f1_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(10):
        a, b = rng.random((24, 24)) < 0.05, rng.random((24, 24)) < 0.05
        for tol in (0, 1, 1.5, 3):
            assert edge_f1(a, b, tol) == pytest.approx(_brute_f1(a, b, tol), abs=1e-6)


def test_foreground_mask_recovers_the_shape():
    for i in range(30):
        s = render_sample(5, i)
        assert mask_iou(foreground_mask(s.image), s.mask > 0) > 0.9, s.caption


def test_control_fidelity_on_ground_truth_and_mismatches():
    s, other = render_sample(5, 0), render_sample(5, 1)
    mask_c = np.repeat(s.mask[..., None], 3, 2)
    edge_c = np.repeat(s.edges[..., None], 3, 2)
    assert control_fidelity(s.image, mask_c, "mask") > 0.9
    assert control_fidelity(s.image, edge_c, "edges") == pytest.approx(1.0)
    assert control_fidelity(other.image, mask_c, "mask") < 0.5
    assert control_fidelity(other.image, edge_c, "edges") < 0.5
    # Float images in [0, 1] and channel-first tensors give the same numbers as uint8.
    import torch

    as_float = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
    assert control_fidelity(as_float, edge_c, "edges") == pytest.approx(1.0)
    assert np.array_equal(canny_edges(s.image), s.edges)
    with pytest.raises(ValueError, match="kind"):
        control_fidelity(s.image, mask_c, "depth")
