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
    from ..training.video.__main__ import run as run_video

    return run_video(args)
