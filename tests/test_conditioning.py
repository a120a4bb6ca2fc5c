"""Condition conversions: grayscale, RGBA, 16-bit, floats, sizes, and clear errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from controlnext.conditioning import load_condition


def test_uint8_rgb_and_grayscale():
    arr = np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3) % 256
    t = load_condition(PIL.Image.fromarray(arr.astype(np.uint8)))
    assert t.shape == (1, 3, 64, 64)
    torch.testing.assert_close(t[0, 1], torch.from_numpy(arr[..., 1] / 255.0).float())
    g = load_condition(PIL.Image.fromarray(arr[..., 0].astype(np.uint8), "L"))
    assert torch.equal(g[0, 0], g[0, 2]) and torch.equal(g[0, 0], t[0, 0])


def test_rgba_is_composited_on_black():
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[:4, :, 3] = 255  # top half opaque, bottom transparent
    t = load_condition(PIL.Image.fromarray(arr, "RGBA"))[0]
    assert torch.allclose(t[:, :4], torch.tensor(200 / 255.0)) and torch.all(t[:, 4:] == 0)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    for t in (load_condition(PIL.Image.fromarray(arr)), load_condition(arr)):
        assert torch.allclose(t, torch.tensor(32768 / 65535.0), atol=1e-6)


def test_float_range_and_types():
    assert load_condition(torch.full((3, 4, 4), 0.5)).shape == (1, 3, 4, 4)
    assert load_condition(torch.rand(2, 1, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_condition(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="channels"):
        load_condition(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="Unsupported condition type"):
        load_condition(42)
    with pytest.raises(FileNotFoundError):
        load_condition("/no/such/condition.png")


def test_resize_and_batch_sizes(tmp_path):
    a = PIL.Image.new("RGB", (32, 32), (255, 0, 0))
    b = PIL.Image.new("RGB", (16, 16), (0, 255, 0))
    with pytest.raises(ValueError, match="different sizes"):
        load_condition([a, b])
    t = load_condition([a, b], size=(24, 24))
    assert t.shape == (2, 3, 24, 24)
    torch.testing.assert_close(t[0, 0], torch.ones(24, 24))
    path = tmp_path / "c.png"
    a.save(path)
    assert load_condition(str(path)).shape == (1, 3, 32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read"):
        load_condition(tmp_path / "bad.png")
