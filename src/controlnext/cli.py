"""`controlnext` command line: one entry point, one module per subcommand under :mod:`controlnext.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module in controlnext.commands exposing `register(subparsers)`; each sets `func` on its parser.
COMMANDS = {
    "generate": "generate",
    "preprocess": "preprocess",
    "train": "train",
    "train-video": "train_video",
    "demo": "demo",
    "eval": "evaluate",
    "make-dataset": "make_dataset",
    "bench": "bench",
    "video": "video",
    "web": "web",
}


class UserError(Exception):
    """An error caused by the user's input; printed as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnext",
        description="Controllable image and video generation with ControlNeXt (SD1.5, SDXL, SVD).",
        epilog="Run `controlnext COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"controlnext.commands.{module}")
        except ModuleNotFoundError as err:  # a command whose module is not part of this install
            if err.name != f"controlnext.commands.{module}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"controlnext {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
