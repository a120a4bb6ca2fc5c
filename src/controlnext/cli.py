"""`controlnext` command line: one entry point, one module per subcommand under :mod:`controlnext.commands`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterator

# Subcommand name -> module in controlnext.commands exposing `register(subparsers)`; each sets `func` on its parser.
COMMANDS = {
    "generate": "generate",
    "preprocess": "preprocess",
    "train": "train",
    "train-video": "train_video",
    "demo": "demo",
    "eval": "evaluate",
    "make-dataset": "make_dataset",
    "make-shards": "make_shards",
    "check-shards": "check_shards",
    "bench": "bench",
    "video": "video",
    "web": "web",
    "models": "models",
    "download": "download",
}


class UserError(Exception):
    """An error caused by the user's input; printed as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnext",
        description="Controllable image and video generation with ControlNeXt (SD1.5, SDXL, SD3, Flux, SVD).",
        epilog="Run `controlnext COMMAND --help` for the options of one command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"controlnext {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' warnings and loading bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"controlnext.commands.{module}")
        except ModuleNotFoundError as err:  # a command whose module is not part of this install
            if err.name != f"controlnext.commands.{module}":
                raise
            continue
        mod.register(sub)
    for command in sub.choices.values():  # `controlnext demo -v` as well as `controlnext -v demo`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook(module)`` once the module ``name`` has been imported (before anything can log through it)."""

    def __init__(self, name: str, hook: Callable) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def run(module) -> None:
                exec_module(module)
                self.hook(module)

            spec.loader.exec_module = run
        return spec


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide the warnings, log lines and loading bars of the libraries under the CLI; controlnext's own stay.

    They are advice to developers (a missing torchvision, a deprecated argument name) that a user can do nothing
    about; ``-v`` shows them. Everything is restored on exit, so calling :func:`main` in-process changes nothing.
    """
    restore: list[Callable[[], None]] = []

    def quiet(module) -> None:  # transformers.utils.logging or diffusers.utils.logging
        level, bars = module.get_verbosity(), module.is_progress_bar_enabled()
        module.set_verbosity_error()
        module.disable_progress_bar()
        restore.append(lambda: (module.set_verbosity(level), bars and module.enable_progress_bar()))

    hooks = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        if name in sys.modules:
            quiet(sys.modules[name])
        else:
            hooks.append(_AfterImport(name, quiet))
    sys.meta_path[:0] = hooks
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(?!controlnext\b)")  # warnings raised outside controlnext
            yield
    finally:
        for hook in hooks:
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
        for undo in reversed(restore):
            undo()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.nullcontext() if args.verbose else quiet_libraries():
            return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"controlnext {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m controlnext.cli`: run the imported module's main, whose UserError is the one the commands raise
    from controlnext.cli import main as _main

    sys.exit(_main())
