"""``python -m controlnext.train`` / ``accelerate launch -m controlnext.train``: train a ControlNeXt module.

Same options as ``controlnext train``; every process of a distributed launch runs this module.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the training options and run; bad input ends with a one-line error and exit status 2."""
    from .hub import train_and_push
    from .training import parse_train_args, train

    cfg = parse_train_args(argv)
    try:
        train_and_push(train, cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"controlnext.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
