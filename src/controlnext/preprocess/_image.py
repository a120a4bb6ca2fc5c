"""Image conversion helpers shared by the preprocessors (PIL / numpy / path in, RGB uint8 arrays out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ImageInput = Image.Image | np.ndarray | str | Path

__all__ = ["ImageInput", "to_rgb_array", "to_gray_array", "to_pil", "open_image", "fit_to_size"]


def open_image(path: str | Path) -> Image.Image:
    """Open an image file with its EXIF orientation applied; clear errors for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot read {path.name} as an image ({err}); expected PNG, JPEG, WebP, BMP, TIFF.") from err
    return ImageOps.exif_transpose(img)


def _as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_uint8(image))
    raise TypeError(f"Expected a PIL image, a numpy array or a path, got {type(image).__name__}.")


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """(H,W), (H,W,1|3|4) arrays of uint8, uint16 or floats in [0, 1] -> uint8 with the same channels."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}.")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    raise ValueError(f"Unsupported image array dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1].")


def to_pil(image: ImageInput) -> Image.Image:
    """Any supported input as an RGB PIL image (alpha composited on black, 16-bit scaled to 8-bit)."""
    return Image.fromarray(to_rgb_array(image))


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any supported input as an (H, W, 3) uint8 RGB array."""
    img = _as_pil(image)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 65535.0 if img.mode.startswith("I;16") or hi > 255 else 255.0
        gray = np.clip(arr / scale * 255.0, 0, 255).round().astype(np.uint8) if lo >= 0 else _minmax_u8(arr)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB")).copy()


def _minmax_u8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def to_gray_array(image: ImageInput) -> np.ndarray:
    """Any supported input as an (H, W) uint8 luma array (ITU-R 601, as PIL's 'L' mode)."""
    return np.asarray(Image.fromarray(to_rgb_array(image)).convert("L")).copy()


def fit_to_size(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """Resize ``image`` to exactly ``width`` x ``height``.

    ``mode='crop'`` scales to cover the target and crops the centre (keeps the aspect ratio, as most web UIs do),
    ``'pad'`` scales to fit inside and pads with black, ``'stretch'`` ignores the aspect ratio.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"Target size must be positive, got {width}x{height}.")
    if image.size == (width, height):
        return image
    if mode == "crop":
        return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    if mode == "pad":
        return ImageOps.pad(image, (width, height), method=Image.Resampling.LANCZOS, color=(0, 0, 0))
    if mode == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    raise ValueError(f"Resize mode must be 'crop', 'pad' or 'stretch', got {mode!r}.")
