"""The flag reference of every `controlnext` command as markdown: the part of docs/cli.md after its marker line.

    python scripts/cli_reference.py           # print it
    python scripts/cli_reference.py --write   # replace it in docs/cli.md (the hand-written part above stays)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from controlnext.cli import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
MARKER = "Generated from the parsers"  # the line after which docs/cli.md is this script's output


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        hidden = set(getattr(action, "deprecated", ()))
        names = [s for s in action.option_strings if s not in hidden] or [action.dest.upper()]
        text = " ".join((action.help or "").split()).replace("|", "\\|")
        if action.default not in (None, argparse.SUPPRESS, False) and "default" not in text.lower():
            text += f" (default: {action.default})"
        if action.choices and "one of" not in text:
            text += f" [{', '.join(map(str, action.choices))}]"
        rows.append(f"| `{', '.join(names)}` | {text} |")
    return rows


def main() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        kinds = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        print(f"### `controlnext {name}`\n\n{' '.join((sub.description or '').split())}\n")
        print("| flag | meaning |\n|---|---|")
        print("\n".join(_flags(sub)) + "\n")
        for kind_action in kinds:
            for kind, kp in kind_action.choices.items():
                print(f"#### `controlnext {name} {kind}`\n\n| flag | meaning |\n|---|---|")
                print("\n".join(_flags(kp)) + "\n")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        text = DOC.read_text()
        head = text[: text.index("\n", text.index(MARKER)) + 1]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            main()
        DOC.write_text(f"{head}\n{out.getvalue()}")
    else:
        main()
