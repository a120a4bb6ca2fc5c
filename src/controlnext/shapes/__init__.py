"""Procedural datasets the project owns end to end (see :mod:`controlnext.shapes.world`)."""

from .world import (
    COLOURS,
    SHAPES,
    VOCABULARY,
    ShapeSample,
    canny_edges,
    caption_for,
    condition_image,
    render_batch,
    render_sample,
)
from .writer import write_dataset

__all__ = [
    "COLOURS",
    "SHAPES",
    "VOCABULARY",
    "ShapeSample",
    "canny_edges",
    "caption_for",
    "condition_image",
    "render_batch",
    "render_sample",
    "write_dataset",
]
