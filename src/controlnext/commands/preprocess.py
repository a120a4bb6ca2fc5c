"""`controlnext preprocess KIND INPUT -o OUTPUT`: make a control condition image from a picture (or keypoints)."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_SIDE = 4096  # --size, per side (the largest output `generate` makes)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input image (for pose also an OpenPose .json keypoint file)")
    p.add_argument("-o", "--output", required=True, help="output image file (.png recommended)")
    p.add_argument("--size", metavar="WxH", help="resize the input to WxH first (centre crop to keep the aspect ratio)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="make a control image (canny, mask, scribble, segment, pose, depth) from a picture",
        description="Turn a picture into a control condition image. Nothing is downloaded: pose and depth "
        "estimation use model files you already have.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    p = kinds.add_parser("canny", help="Canny edges (OpenCV), white on black")
    _add_common(p)
    p.add_argument("--low", type=float, default=100, help="low hysteresis threshold (default 100)")
    p.add_argument("--high", type=float, default=200, help="high hysteresis threshold (default 200)")
    p.add_argument("--blur", type=int, default=0, help="Gaussian blur kernel size before edges (0 = off)")
    p.add_argument("--per-channel", action="store_true", help="edges of R, G, B separately, joined (shapes demo)")

    p = kinds.add_parser("mask", help="binary mask from brightness or alpha, white on black")
    _add_common(p)
    p.add_argument("--threshold", type=float, default=128, help="0..255 (default 128)")
    p.add_argument("--invert", action="store_true", help="swap white and black")
    p.add_argument("--source", choices=("auto", "luma", "alpha"), default="auto")

    p = kinds.add_parser("scribble", help="white strokes on black from a sketch or a photo")
    _add_common(p)
    p.add_argument("--mode", choices=("sketch", "photo"), default="sketch")
    p.add_argument("--threshold", type=float, default=128, help="ink threshold for sketches, 0..255")
    p.add_argument("--thickness", type=int, default=3, help="stroke width in pixels (default 3)")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto", help="ink is dark on light (auto)")

    p = kinds.add_parser("segment", help="flat colour segmentation map")
    _add_common(p)
    p.add_argument("--segments", type=int, default=8, help="number of regions (default 8)")
    p.add_argument("--smoothing", type=int, default=7, help="speckle removal kernel (0 = off)")
    p.add_argument("--source", choices=("photo", "map"), default="photo", help="cluster a photo or clean a map")
    p.add_argument("--seed", type=int, default=0)

    p = kinds.add_parser("pose", help="OpenPose-style skeleton from keypoints (.json) or a photo (DWPose)")
    _add_common(p)
    p.add_argument("--pose-models", metavar="DIR", help="folder with yolox_l.onnx and dw-ll_ucoco_384.onnx")
    p.add_argument("--width", type=int, help="canvas width for keypoint files without one")
    p.add_argument("--height", type=int, help="canvas height for keypoint files without one")
    p.add_argument("--min-score", type=float, default=0.3, help="skip keypoints scoring below this")
    p.add_argument("--no-hands", action="store_true")
    p.add_argument("--no-face", action="store_true")

    p = kinds.add_parser("depth", help="depth map (near = bright) from a local depth model or an existing map")
    _add_common(p)
    p.add_argument("--depth-model", metavar="DIR", help="local transformers depth-estimation model folder")
    p.add_argument("--from-map", action="store_true", help="INPUT is already a depth map: normalise it")
    p.add_argument("--invert", action="store_true", help="flip near/far")
    p.add_argument("--allow-download", action="store_true", help="allow a hub id for --depth-model (online)")

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
    result.save(out)
    print(f"wrote {out} ({result.width}x{result.height}, {args.kind})")
    return 0


def _make(args: argparse.Namespace, src: Path):
    from .. import preprocess as pp

    is_keypoints = args.kind == "pose" and src.suffix.lower() == ".json"
    size = _parse_size(args.size) if args.size else None
    image = None if is_keypoints else pp.open_image(src)
    if image is not None and size:
        image = pp.fit_to_size(pp.to_pil(image), *size)

    if args.kind == "canny":
        result = pp.canny(image, args.low, args.high, blur=args.blur, per_channel=args.per_channel)
    elif args.kind == "mask":
        result = pp.mask(image, args.threshold, invert=args.invert, source=args.source)
    elif args.kind == "scribble":
        invert = {"auto": None, "yes": True, "no": False}[args.invert]
        result = pp.scribble(image, args.mode, args.threshold, args.thickness, invert)
    elif args.kind == "segment":
        result = pp.segment(image, args.segments, args.smoothing, args.source, args.seed)
    elif args.kind == "pose":
        size = size if (is_keypoints and size) else (args.width, args.height)
        result = pp.pose(
            src if is_keypoints else image,
            model_dir=args.pose_models,
            width=size[0],
            height=size[1],
            min_score=args.min_score,
            hands=not args.no_hands,
            face=not args.no_face,
        )
    elif args.kind == "depth":
        if args.from_map:
            result = pp.depth_from_map(image, invert=args.invert)
        else:
            result = pp.depth(image, args.depth_model, invert=args.invert, allow_download=args.allow_download)
    else:  # argparse restricts the choices; kept for type checkers
        raise ValueError(f"Unknown preprocessor {args.kind!r}.")
    return result
