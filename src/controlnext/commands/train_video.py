"""`controlnext train-video`: train a video (SVD) ControlNeXt model on video + pose clips (see docs/video.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..training.video.config import add_video_train_arguments

    parser = subparsers.add_parser(
        "train-video",
        help="train a video ControlNeXt module on SVD (accelerate)",
        description="Train a ControlNeXt module (and the SVD UNet, as published) on video + pose clips. "
        "Also runnable as `accelerate launch -m controlnext.training.video ...`.",
    )
    add_video_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..training.video.__main__ import run as run_video
    from ..zoo import get_entry, resolve

    name = getattr(args, "controlnext", None)
    if name is not None and (entry := get_entry(name)) is not None:  # fine-tune a published module: its cached file
        if entry.family != "svd":
            raise UserError(f"--controlnext {name} is not a video control module (family {entry.family}); "
                            "`controlnext train-video` fine-tunes the SVD modules (svd-v1, svd-v2)")  # fmt: skip
        args.controlnext = str(resolve(name, with_unet=False)[1])
    return run_video(args)
