"""``python -m controlnext.training.video``: train a video ControlNeXt model (also under ``accelerate launch -m``)."""

from __future__ import annotations

import argparse
import sys

from .config import add_video_train_arguments, video_config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnext-train-video",
        description="Train a ControlNeXt module (and the SVD UNet, as published) on video + pose clips.",
    )
    return add_video_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ...hub import train_and_push
    from .loop import train_video

    train_and_push(train_video, video_config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"controlnext video training: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
