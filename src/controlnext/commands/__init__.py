"""One module per `controlnext` subcommand; each exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

THREADS_HELP = "torch CPU threads (default {}; the demo models are tiny, and extra threads only add overhead)"


class Deprecated(argparse.Action):
    """An old flag spelling: still accepted for a release, with one line naming the new one; hidden from --help."""

    def __init__(self, option_strings, dest, new: str = "", append: bool = False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.append = new, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        if self.append:  # an old spelling of a repeatable option
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)
        setattr(namespace, f"spelling:{self.dest}", option_string)  # errors name the flag as typed (spelled_as)


def spelled_as(args: argparse.Namespace, dest: str, flag: str) -> str:
    """The spelling of an option the user typed: ``flag``, or the old spelling it came as."""
    return getattr(args, f"spelling:{dest}", flag)


def deprecated_alias(p, old: str, new: str, dest: str | None = None, append: bool = False, **kwargs) -> None:
    """Accept ``old`` as a hidden spelling of the option ``new`` (same ``dest``; ``append`` for a repeatable one)."""
    dest = dest or new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, action=Deprecated, new=new, append=append, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS, **kwargs)  # fmt: skip


def add_threads_option(p, default: int | None) -> None:
    """``--threads``: ``default`` None keeps torch's own count (the commands then use 1 for the demo model)."""
    shown = default or "1 for the demo model, else torch's"
    p.add_argument("--threads", type=int, default=default, help=THREADS_HELP.format(shown))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave torch's setting), restored afterwards."""
    from ..cli import UserError

    if n is None:
        yield
        return
    if n < 1:
        raise UserError(f"--threads must be at least 1, got {n}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def add_sampling_options(p) -> None:
    """Options shared by the commands that sample the small shipped models (`demo`, `eval`)."""
    # Defaults are the demo model's (controlnext.shapes.demo: 20 steps, guidance 3), filled in by the command so
    # that building the parser does not import torch.
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the demo model's, 20)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the demo model's, 3)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    add_threads_option(p, 1)
