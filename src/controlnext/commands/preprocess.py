"""`controlnext preprocess KIND INPUT -o OUTPUT`: make a control condition image from a picture (or keypoints)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import deprecated_alias

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_SIDE = 4096  # --size, per side (the largest output `generate` makes)


def _add_option(p: argparse.ArgumentParser, opt) -> None:
    """One command-line flag generated from a registry option (values are checked by the registry, not argparse)."""
    if opt.type is bool:  # --name and --no-name, whichever the default
        flag = opt.flag or f"--{opt.name.replace('_', '-')}"
        p.add_argument(flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                       help=f"{opt.help} (default: {'on' if opt.default else 'off'})")  # fmt: skip
        return
    bits = [opt.help]
    if opt.choices:
        bits.append(f"one of {', '.join(map(str, opt.choices))}")
    elif opt.low is not None and opt.high is not None:
        bits.append(f"{opt.low:g}..{opt.high:g}")
    if opt.default is not None:
        bits.append(f"default {opt.default}")
    metavar = "DIR" if opt.path else ("VALUE" if opt.choices else opt.type.__name__.upper())
    p.add_argument(opt.cli_flag, dest=opt.name, default=None, metavar=metavar, help="; ".join(bits))
    for alias in opt.aliases:
        deprecated_alias(p, alias, opt.cli_flag, dest=opt.name)


def register(subparsers) -> None:
    from ..preprocess.registry import REGISTRY

    parser = subparsers.add_parser(
        "preprocess",
        help="make a control image (canny, mask, scribble, segment, pose, depth) from a picture",
        description="Turn a picture into a control condition image. Nothing is downloaded: pose and depth "
        "estimation use model files you already have.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for pre in REGISTRY.values():
        if pre.name == "none":
            continue
        p = kinds.add_parser(pre.name, help=pre.help, description=pre.help)
        p.add_argument("input", help=pre.input_help)
        p.add_argument("-o", "--output", required=True, help="output image file (.png recommended)")
        p.add_argument("--size", metavar="WxH", help="resize the input to WxH first (centre crop keeps the aspect)")
        for opt in pre.options:
            _add_option(p, opt)
    parser.set_defaults(func=run)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 512x768 (width x height), got {text!r}.") from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"--size must be between 1x1 and {MAX_SIDE}x{MAX_SIDE}, got {text!r}.")
    return w, h


def run(args: argparse.Namespace) -> int:
    src = Path(args.input)
    if not src.is_file():
        raise FileNotFoundError(f"Input not found: {src}")
    out = Path(args.output)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"Output must be an image file ({', '.join(IMAGE_SUFFIXES)}), got {out.name!r}.")
    try:
        result = _make(args, src)
    except MemoryError:
        raise ValueError(f"Out of memory making the {args.kind} map of {src.name}; give a smaller --size.") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out, **_settings(args, src) if out.suffix.lower() == ".png" else {})
    print(f"wrote {out} ({result.width}x{result.height}, {args.kind})")
    return 0


def _settings(args: argparse.Namespace, src: Path) -> dict:
    """``pnginfo`` recording how the condition was made, under the key the web app and ``generate`` write."""
    import json

    from PIL import PngImagePlugin

    from .. import preprocess as pp
    from ..web.generation import METADATA_KEY

    pre = pp.get_preprocessor(args.kind)
    given = {o.name: getattr(args, o.name) for o in pre.options if getattr(args, o.name) is not None}
    record = {"command": "preprocess", "preprocessor": args.kind, "preprocessor_options": pre.parse(given),
              "input": str(src.resolve()), "size": args.size}  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(record, sort_keys=True))
    info.add_text("Software", "controlnext")
    return {"pnginfo": info}


def _make(args: argparse.Namespace, src: Path):
    from .. import preprocess as pp

    pre = pp.get_preprocessor(args.kind)
    options = {o.name: getattr(args, o.name) for o in pre.options if getattr(args, o.name) is not None}
    size = _parse_size(args.size) if args.size else None
    if args.kind == "pose" and src.suffix.lower() == ".json":  # a keypoint file has no pixels: --size is the canvas
        if size:
            options["width"], options["height"] = size
        return pre.run(src, options)
    image = pp.open_image(src)
    if size:
        image = pp.fit_to_size(pp.to_pil(image), *size)
    return pre.run(image, options)
