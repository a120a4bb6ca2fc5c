"""Turning user condition images (PIL, NumPy, tensors, paths; any common mode) into (B, 3, H, W) tensors in [0, 1].

Conversions, all tested:
* grayscale (L, 1-bit, single-channel arrays) is repeated to RGB;
* RGBA / LA / palette images with transparency are composited on black (transparent = "no condition", which is what
  edge maps, scribbles and masks mean by it);
* 16-bit images (PIL ``I;16``/``I`` modes, ``uint16`` arrays) are scaled by 1/65535, never clipped at 255;
* float arrays/tensors must already lie in [0, 1] (NaN and infinity are refused); anything else is an error, not a
  guess.
Batches come in the layouts diffusers' ControlNet pipelines accept: a NumPy array (B, H, W, C), a tensor
(B, C, H, W), or a list of images, of (1, C, H, W) tensors or of (1, H, W, C) arrays.
Resizing (when ``size`` is given) is bilinear with antialiasing; a condition whose aspect ratio differs from the
target by more than 1% is stretched to fit, with a warning naming both sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ConditionInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | Path
# Condition files are decoded only up to this many pixels (8192 x 8192): above it the header alone refuses them.
MAX_CONDITION_PIXELS = 8192 * 8192


def _from_pil(img: PIL.Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        return arr / (65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    return np.asarray(img).astype(np.float32) / 255.0


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise ValueError(f"Unsupported condition array dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1].")


def _to_chw(arr: np.ndarray | torch.Tensor, channels_last: bool) -> torch.Tensor:
    t = torch.as_tensor(arr, dtype=torch.float32)
    if t.dim() not in (2, 3):
        raise ValueError(
            f"A condition image has shape {tuple(t.shape)}; expected (H, W) or (H, W, C) for arrays, (C, H, W) for "
            "tensors, or a batch of them: an array (B, H, W, C), a tensor (B, C, H, W), or a list."
        )
    if t.dim() == 2:
        t = t[None]
    elif channels_last:
        t = t.permute(2, 0, 1)
    if t.shape[0] not in (1, 2, 3, 4):
        raise ValueError(
            f"Condition has {t.shape[0]} channels (shape {tuple(t.shape)}); expected 1 (gray), 2 (gray+alpha), "
            "3 (RGB) or 4 (RGBA), channels-last for arrays and channels-first for tensors."
        )
    if t.shape[0] in (2, 4):  # composite on black: colour * alpha
        t = t[:-1] * t[-1:]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t


def _one(image: ConditionInput) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Condition image not found: {path}")
        limit = f"conditions are limited to {MAX_CONDITION_PIXELS / 1e6:.0f} MP; downscale it first."
        try:
            with PIL.Image.open(path) as im:
                if im.width * im.height > MAX_CONDITION_PIXELS:
                    raise ValueError(f"The condition image {path} is {im.width}x{im.height} pixels; {limit}")
                im.load()
                image = im.copy()
        except PIL.UnidentifiedImageError as err:
            raise ValueError(f"Cannot read {path} as an image (expected PNG, JPEG, WebP, ...).") from err
        except PIL.Image.DecompressionBombError as err:  # PIL refuses it from the header, before the check above
            raise ValueError(f"The condition image {path} is too large to decode ({err}); {limit}") from err
        except OSError as err:
            raise ValueError(f"Cannot read {path} as an image: the file is damaged or truncated ({err}).") from err
    if isinstance(image, PIL.Image.Image):
        return _to_chw(_from_pil(image), channels_last=True)
    if isinstance(image, np.ndarray):
        return _to_chw(_from_array(image), channels_last=image.ndim == 3)
    if isinstance(image, torch.Tensor):
        return _to_chw(image.detach().float().cpu(), channels_last=False)
    raise TypeError(f"Unsupported condition type {type(image).__name__}; expected a PIL image, array, tensor or path.")


def _split_batch(image: ConditionInput) -> list[ConditionInput]:
    """One input as single images: a 4-D array (B, H, W, C) or tensor (B, C, H, W) is B images."""
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return list(image)
    return [image]


def load_condition(
    image: ConditionInput | Sequence[ConditionInput], size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Return the condition(s) as a float32 (B, 3, H, W) tensor in [0, 1], resized to ``size`` = (H, W) if given.

    ``image`` is one image (PIL, path, array (H, W[, C]), tensor (C, H, W)), a batch (array (B, H, W, C), tensor
    (B, C, H, W)), or a list of images or batches, concatenated (all must share a size unless ``size`` is given).
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("Got an empty list of condition images.")
        items = [_one(one) for im in image for one in _split_batch(im)]
    else:
        items = [_one(one) for one in _split_batch(image)]
    if not all(bool(torch.isfinite(t).all()) for t in items):
        raise ValueError("Condition values must be finite numbers in [0, 1]; the condition holds NaN or infinity.")
    lo = min(float(t.min()) for t in items)
    hi = max(float(t.max()) for t in items)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"Condition values must lie in [0, 1] (floats) or come from uint8/uint16 images; got [{lo:.3g}, {hi:.3g}]."
        )
    out = []
    for t in items:
        t = t.clamp(0, 1)
        if size is not None and tuple(t.shape[-2:]) != tuple(size):
            h, w = t.shape[-2:]
            if abs((w / h) / (size[1] / size[0]) - 1) > 0.01:
                logger.warning(
                    "Condition of size %dx%d (WxH) is stretched to %dx%d: its aspect ratio differs from the output's.",
                    w,
                    h,
                    size[1],
                    size[0],
                )
            t = F.interpolate(t[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"Condition images in one batch have different sizes {sorted(shapes)}; pass `size` to resize.")
    return torch.stack(out)
