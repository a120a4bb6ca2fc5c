"""`controlnext download NAME`: fetch a model-zoo entry's files into the huggingface_hub cache."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download a published checkpoint by name into the hub cache (see `controlnext models`)",
        description="Download every file of a model-zoo entry into the huggingface_hub cache (resumable, with a "
        "progress bar). Files already cached are not fetched again. With HF_HUB_OFFLINE=1 or no network it says so "
        "in one line.",
    )
    p.add_argument("name", help="a name from `controlnext models` (e.g. sdxl-depth, svd-v2, dwpose)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..zoo import download

    for path in download(args.name):
        print(path)
    return 0
