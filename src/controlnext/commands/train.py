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

    from ..cli import UserError
    from ..hub import train_and_push
    from ..shapes.demo import demo_ref
    from ..training import config_from_args, train
    from ..zoo import get_entry, resolve

    if (ref := demo_ref(args.pretrained_model)) is not None:  # the shipped base, to train a new module on
        args.pretrained_model = str(ref[0])
    name = getattr(args, "controlnext", None)
    if name is not None and (ref := demo_ref(name)) is not None:  # demo:edges / demo:mask: the shipped module
        args.controlnext = str(ref[1])
    elif name is not None and (entry := get_entry(name)) is not None:  # fine-tune a published module: its cached file
        if entry.family not in ("sd15", "sdxl", "sd3", "flux"):
            raise UserError(f"--controlnext {name} is not an image control module (family {entry.family}); "
                            "`controlnext train` fine-tunes SD1.5, SDXL, SD3 and Flux modules")  # fmt: skip
        args.controlnext = str(resolve(name, with_unet=False)[1])  # train has no UNet weights to start from
    cfg = config_from_args(args)
    cfg.command = " ".join(["controlnext", *map(shlex.quote, sys.argv[1:])])
    train_and_push(train, cfg)
    return 0
