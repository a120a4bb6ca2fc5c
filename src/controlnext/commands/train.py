"""``controlnext train``: train a ControlNeXt control module (and the published UNet subset) for SD1.5, SDXL, SD3 or
Flux."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..training.config import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a control module on (image, condition, caption) data",
        description=(
            "Train a ControlNeXt control module on a stock SD1.5/SDXL UNet with accelerate. Runs in this process; "
            "for several GPUs or nodes use `accelerate launch -m controlnext.train` with the same options."
        ),
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from ..hub import train_and_push
    from ..shapes.demo import demo_ref
    from ..training import config_from_args, train

    if (ref := demo_ref(args.pretrained_model)) is not None:  # the shipped base, to train a new module on
        args.pretrained_model = str(ref[0])
    cfg = config_from_args(args)
    cfg.command = " ".join(["controlnext", *map(shlex.quote, sys.argv[1:])])
    train_and_push(train, cfg)
    return 0
