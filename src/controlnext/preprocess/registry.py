"""The preprocessor registry: each preprocessor's function and its options (name, type, default, range, help).

This is the one source of truth for preprocessor options: the ``controlnext preprocess`` flags and the web app's
widgets are generated from it, and both pass a dict of options to :meth:`Preprocessor.run`, which checks every value
(type, range, choice) before the function runs. Adding a preprocessor is one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ._image import ImageInput, to_pil
from .canny import canny
from .depth import depth, depth_from_map
from .masks import mask, scribble
from .pose import pose
from .segment import MAX_SEGMENTS, segment

__all__ = ["Option", "Preprocessor", "REGISTRY", "get_preprocessor"]


@dataclass(frozen=True)
class Option:
    """One option of a preprocessor: the function's keyword ``name``, its type, default, range and help.

    ``choices`` lists the accepted values; ``values`` maps a choice shown to users to the value passed to the
    function (``"auto"`` -> ``None``). ``low``/``high`` bound numbers (inclusive). ``path`` marks a local file or
    folder (no range). ``flag`` overrides the command-line flag (default ``--name-with-dashes``; a boolean that
    defaults to true becomes ``--no-name``); ``aliases`` are older spellings, accepted with a deprecation note.
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    values: Mapping[Any, Any] = field(default_factory=dict)
    path: bool = False
    flag: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def cli_flag(self) -> str:
        if self.flag:
            return self.flag
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.type is bool and self.default is True else f"--{dashed}"

    def parse(self, value: Any, owner: str) -> Any:
        """``value`` converted to the option's type and checked, as users give it (before ``values`` mapping)."""
        where = f"{owner} option {self.name!r}"
        if value is None and (self.default is None or self.path):
            return None
        if self.type is bool:
            if not isinstance(value, (bool, int)) or value not in (0, 1, True, False):
                raise ValueError(f"{where} must be true or false, got {value!r}.")
            value = bool(value)
        elif self.type in (int, float):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where} must be a number, got {value!r}.") from None
            if not math.isfinite(number):
                raise ValueError(f"{where} must be a finite number, got {value!r}.")
            if self.type is int:
                if number != int(number):
                    raise ValueError(f"{where} must be a whole number, got {value!r}.")
                number = int(number)
            lo = -math.inf if self.low is None else self.low
            hi = math.inf if self.high is None else self.high
            if not lo <= number <= hi:
                raise ValueError(f"{where} must lie in [{self.low}, {self.high}], got {value!r}.")
            value = number
        else:
            value = str(value)
        if self.choices and value not in self.choices:
            raise ValueError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}.")
        return value

    def check(self, value: Any, owner: str) -> Any:
        """``value`` parsed (:meth:`parse`) and mapped through ``values``: what the function receives."""
        value = self.parse(value, owner)
        return self.values.get(value, value) if self.values else value


@dataclass(frozen=True)
class Preprocessor:
    """A named preprocessor: ``fn(image, **options) -> RGB PIL image`` and its declared options."""

    name: str
    fn: Callable[..., Image.Image]
    help: str
    options: tuple[Option, ...] = ()
    label: str = ""  # how the web app lists it
    input_help: str = "input image"

    def defaults(self) -> dict[str, Any]:
        """Every option at its default, as users give them (before ``values`` mapping)."""
        return {o.name: o.default for o in self.options}

    def parse(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in, every value typed and checked, as users give them (``"auto"``, not ``None``).

        An unknown option is an error naming the known ones.
        """
        given = dict(options or {})
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"Preprocessor {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join(known) or 'none'}."
            )
        return {name: o.parse(given.get(name, o.default), self.name) for name, o in known.items()}

    def check(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`parse`, then each value mapped through its option's ``values``: what the function receives."""
        return {o.name: o.values.get(v, v) for o, v in zip(self.options, self.parse(options).values())}

    def run(self, image: ImageInput, options: Mapping[str, Any] | None = None) -> Image.Image:
        """Check ``options`` and run the preprocessor on ``image``."""
        return self.fn(image, **self.check(options))


def _identity(image: ImageInput) -> Image.Image:
    return to_pil(image)


def _depth(image: ImageInput, model=None, from_map: bool = False, invert: bool = False, allow_download=False):
    return depth_from_map(image, invert=invert) if from_map else depth(image, model, invert, allow_download)


_INVERT = Option("invert", bool, False, "swap white and black")

REGISTRY: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", _identity, "use the image as the condition as it is", label="none (image is a condition)"),
        Preprocessor(
            "canny",
            canny,
            "Canny edges (OpenCV), white on black",
            (
                # 50/150 on each of R, G, B: what the shipped demo model was trained on and the web app uses.
                Option("low", float, 50, "low hysteresis threshold", 0, 1000, 1),
                Option("high", float, 150, "high hysteresis threshold", 0, 1000, 1),
                Option("blur", int, 0, "Gaussian blur kernel size before edges (0 = off, odd)", 0, 31, 1),
                Option("per_channel", bool, True, "edges of R, G, B separately, joined (the shapes demo's edges; off: "
                       "one pass on the colour image, OpenCV's strongest-channel gradient)"),  # fmt: skip
            ),
            label="canny edges",
        ),
        Preprocessor(
            "mask",
            mask,
            "binary mask from brightness or alpha, white on black",
            (
                Option("threshold", float, 128, "brightness or alpha threshold", 0, 255, 1),
                _INVERT,
                Option("source", str, "auto", "threshold brightness, alpha, or alpha when present",
                       choices=("auto", "luma", "alpha")),  # fmt: skip
            ),
            label="mask (brightness threshold)",
        ),
        Preprocessor(
            "scribble",
            scribble,
            "white strokes on black from a sketch or a photo",
            (
                Option("mode", str, "sketch", "the input is a sketch or a photo", choices=("sketch", "photo")),
                Option("threshold", float, 128, "ink threshold for sketches", 0, 255, 1),
                Option("thickness", int, 3, "stroke width in pixels", 1, 32, 1),
                Option("invert", str, "auto", "the ink is dark on light (auto: detected)",
                       choices=("auto", "yes", "no"), values={"auto": None, "yes": True, "no": False}),  # fmt: skip
            ),
            label="scribble",
        ),
        Preprocessor(
            "segment",
            segment,
            "flat colour segmentation map",
            (
                Option("segments", int, 8, "number of regions", 1, MAX_SEGMENTS, 1),
                Option("smoothing", int, 7, "speckle removal kernel (0 = off)", 0, 31, 1),
                Option("source", str, "photo", "cluster a photo, or clean a colour map", choices=("photo", "map")),
                Option("seed", int, 0, "clustering seed", 0, 2**31 - 1, 1),
            ),
            label="segmentation (colour regions)",
        ),
        Preprocessor(
            "pose",
            pose,
            "OpenPose-style skeleton from keypoints (.json) or a photo (DWPose)",
            (
                Option("model_dir", str, None, "folder with yolox_l.onnx and dw-ll_ucoco_384.onnx", path=True,
                       flag="--dwpose-dir", aliases=("--pose-models",)),  # fmt: skip
                Option("width", int, None, "canvas width for keypoint files without one", 1, 8192, 1),
                Option("height", int, None, "canvas height for keypoint files without one", 1, 8192, 1),
                Option("min_score", float, 0.3, "skip keypoints scoring below this", 0, 1, 0.05),
                Option("hands", bool, True, "draw the hands"),
                Option("face", bool, True, "draw the face"),
            ),
            label="pose (DWPose or keypoints)",
            input_help="input image, or an OpenPose .json keypoint file",
        ),
        Preprocessor(
            "depth",
            _depth,
            "depth map (near = bright) from a local depth model or an existing map",
            (
                Option("model", str, None, "local transformers depth-estimation model folder", path=True,
                       flag="--depth-model"),  # fmt: skip
                Option("from_map", bool, False, "the input is already a depth map: normalise it"),
                _INVERT,
                Option("allow_download", bool, False, "allow a hub id for --depth-model (online)"),
            ),
            label="depth (local model)",
        ),
        Preprocessor(
            "depth-map",
            depth_from_map,
            "normalise an existing depth map (near = bright)",
            (Option("invert", bool, False, "flip near and far"),),
            label="depth (uploaded depth map)",
        ),
    )
}


def get_preprocessor(name: str) -> Preprocessor:
    """The preprocessor called ``name``; an unknown name is an error listing the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown preprocessor {name!r}; choose one of {', '.join(REGISTRY)}.")
    return REGISTRY[name]
