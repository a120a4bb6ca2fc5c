"""`controlnext make-dataset`: write a procedural shapes dataset (images, conditions, captions) for training."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-dataset",
        help="write a procedural shapes dataset to train a control module on",
        description=(
            "Render N images of one coloured shape (circle, square, triangle, star, cross) on a plain background, "
            "with captions ('a red star on a blue background') and a condition image each (Canny edges or the "
            "shape's mask), in the Hugging Face imagefolder layout: metadata.jsonl with file_name, "
            "conditioning_image_file_name and text. Deterministic from --seed."
        ),
    )
    p.add_argument(
        "out", type=Path, help="output folder (created; empty, or a previous shapes dataset, which is replaced)"
    )
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--condition", choices=("edges", "mask"), default="edges", help="condition type (default edges)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..shapes.writer import write_dataset

    if args.n < 1:
        raise UserError(f"--n must be a positive number of samples, got {args.n}")
    if args.size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {args.size}")
    try:
        out = write_dataset(args.out, args.n, seed=args.seed, condition=args.condition, size=args.size)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(f"wrote {args.n} samples ({args.condition}) to {out}")
    return 0
