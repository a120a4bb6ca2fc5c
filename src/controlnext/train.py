"""``python -m controlnext.train`` / ``accelerate launch -m controlnext.train``: train a ControlNeXt module.

Same options as ``controlnext train``; every process of a distributed launch runs this module.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the training options and run; bad input ends with a one-line error and exit status 2."""
    from .training import parse_train_args, train

    cfg = parse_train_args(argv)
    try:
        if cfg.push_to_hub:
            from .hub import check_push, push_outputs

            check_push(cfg.output_dir, cfg.hub_model_id)
        train(cfg)
        if cfg.push_to_hub and os.environ.get("RANK", "0") == "0":  # the main process of a launch uploads
            print(f"uploaded to {push_outputs(cfg.output_dir, cfg.hub_model_id)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"controlnext.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
