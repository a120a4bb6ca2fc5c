"""Limits of the web app and the checks that enforce them (all errors are one clear sentence for the page)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["Limits", "UploadError", "best_device", "load_upload", "user_error", "ALLOWED_IMAGE_SUFFIXES"]

logger = logging.getLogger("controlnext.web")

ALLOWED_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "MPO")


class UploadError(ValueError):
    """An uploaded file that the app refuses (wrong type, too large, unreadable)."""


def user_error(err: Exception | str, title: str) -> gr.Error:
    """The in-page message for a refused input: one log line, no traceback (the input was wrong, not the server)."""
    import gradio as gr  # imported here so that the PNG settings writer (web.generation) works without gradio

    logger.info("%s: %s", title, err)
    return gr.Error(str(err), title=title, print_exception=False)


def best_device() -> str:
    """``"cuda"`` when a CUDA GPU is usable, else ``"cpu"`` (the device the app's pipelines run on)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults suit a desktop GPU; :meth:`for_device` gives smaller CPU ones.

    ``max_seconds`` is the time budget of one request, from the moment it starts running to the last denoising
    step: a generation still denoising when it is spent stops with a message (so does one whose client left).
    """

    max_upload_mb: float = 20.0  # enforced by gradio's upload route before the file reaches the app
    max_upload_pixels: int = 4096 * 4096  # decoded size of an uploaded image
    max_side: int = 2048  # output width/height
    min_side: int = 64
    max_batch: int = 8
    max_steps: int = 150
    max_guidance: float = 30.0
    max_control_scale: float = 5.0
    max_prompt_chars: int = 2000
    max_seconds: float = 600.0

    @classmethod
    def for_device(cls, device: str | None = None, **overrides) -> Limits:
        """The limits for ``device`` (``"cpu"``, ``"cuda"``...; None: :func:`best_device`), then ``overrides``.

        On CPU one 512 px SD1.5 step takes seconds, so sizes, steps and batches are capped to what finishes within
        the time budget; a GPU gets the class defaults.
        """
        device = device or best_device()
        base = cls(max_side=768, max_steps=50, max_batch=2) if device == "cpu" else cls()
        return replace(base, **overrides)

    @property
    def max_file_size(self) -> int:
        """``max_upload_mb`` in bytes (MB = 2**20 bytes), as ``gradio.launch(max_file_size=...)`` takes it."""
        return int(self.max_upload_mb * 2**20)


def load_upload(path: str | Path, limits: Limits) -> Image.Image:
    """Open an uploaded image file with its EXIF orientation applied, refusing what the app cannot use.

    The file's *content* decides its type (PIL's decoder), not its name, and the pixel count is checked from the
    header before the pixels are decoded, so a small file that inflates to a huge image is refused cheaply.
    """
    path = Path(path)
    size_mb = path.stat().st_size / 2**20
    if size_mb > limits.max_upload_mb:
        raise UploadError(f"The file is {size_mb:.1f} MB; uploads are limited to {limits.max_upload_mb:g} MB.")
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UploadError(
            "The uploaded file is not an image this app can read; upload a PNG, JPEG, WebP, BMP or TIFF picture."
        ) from None
    if img.format not in ALLOWED_FORMATS:
        raise UploadError(f"{img.format} images are not supported; upload a PNG, JPEG, WebP, BMP or TIFF picture.")
    w, h = img.size
    if w * h > limits.max_upload_pixels:
        raise UploadError(
            f"The image is {w}x{h} pixels ({w * h / 1e6:.1f} MP); the limit is "
            f"{limits.max_upload_pixels / 1e6:.1f} MP. Please downscale it first."
        )
    try:
        img.load()
    except (OSError, Image.DecompressionBombError) as err:
        raise UploadError(f"The image file is damaged or truncated ({err}).") from None
    return ImageOps.exif_transpose(img)
