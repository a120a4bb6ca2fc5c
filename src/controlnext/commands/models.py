"""`controlnext models`: the model zoo (every published checkpoint, its hub files and recommended settings)."""

from __future__ import annotations

import argparse
import json

COLUMNS = ("name", "family", "variant", "condition", "base model", "scale", "steps", "size", "licence", "repo", "files")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the published ControlNeXt checkpoints (names for --controlnext and `controlnext download`)",
        description="List the model zoo: every published ControlNeXt checkpoint with its hub repository and files, "
        "variant, base model, condition and the control scale and steps its authors use. A name works wherever a "
        "control module is taken (`generate --controlnext sdxl-depth`) and brings those settings as defaults.",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON (one object per entry)")
    p.set_defaults(func=run)


def _row(e) -> tuple[str, ...]:
    def text(v) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    size = "?" if e.size_mb is None else f"{e.size_mb:.0f} MB"
    return (e.name, text(e.family), text(e.variant), e.condition, text(e.base_model), text(e.scale), text(e.steps),
            size, e.license, e.repo, ", ".join(e.files))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..zoo import ZOO, cache_dir

    if args.json:
        print(json.dumps([e.to_json() for e in ZOO.values()], indent=1))
        return 0
    rows = [COLUMNS, *(_row(e) for e in ZOO.values())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"\n`controlnext download NAME` fetches an entry into the hub cache ({cache_dir()}).")
    return 0
