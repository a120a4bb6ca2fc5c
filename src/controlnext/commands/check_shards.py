"""``controlnext check-shards``: read every sample of a shard set before a long run; report counts and bad ones."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .make_shards import _data_arguments

    p = subparsers.add_parser(
        "check-shards",
        help="read and decode every sample of a shard set: counts per shard, unreadable samples",
        description=(
            "Count the samples of a shard set (a folder of .tar files, a brace or glob pattern, parquet files with "
            "--streaming) and decode every one (both images, their sizes, the caption; a cache's tensors). Prints "
            "each shard's counts and every unusable sample with the reason; exits with status 1 if there is any."
        ),
    )
    p.add_argument("shards", help="the shard set, as given to `controlnext train --dataset`")
    p.add_argument("--streaming", action="store_true", help="read parquet files or a hub dataset as shards")
    p.add_argument("--json", dest="json_path", default=None, help="also write the full report to this JSON file")
    p.add_argument("--workers", type=int, default=4, help="shards read in parallel (default: 4)")
    _data_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..training.data import ColumnNames
    from ..training.shards import check_shards, open_shards

    columns = ColumnNames(args.image_column, args.condition_column, args.caption_column)
    shards = open_shards(args.shards, columns, args.streaming, args.dataset_split, args.dataset_config,
                         args.cache_dir)  # fmt: skip
    verify = None
    if shards.cache is not None:
        from ..training.cache import check_cached_row

        verify = check_cached_row
    report = check_shards(shards, verify, workers=args.workers)
    for entry in report["shards"]:
        note = f", {entry['bad']} bad" if entry["bad"] else ""
        print(f"  {entry['file']}: {entry['samples']} samples{note}")
    for name, why in report["problems"]:
        print(f"  shard {name}: {why}")
    for row_id, why in report["bad_rows"][:50]:
        print(f"  sample {row_id}: {why}")
    if len(report["bad_rows"]) > 50:
        print(f"  ... and {len(report['bad_rows']) - 50} more")
    kind = "cache" if shards.cache else "shard set"
    print(f"{args.shards}: {kind} of {len(report['shards'])} shard(s), {report['samples']} samples, "
          f"{report['usable']} usable, {len(report['bad_rows'])} unusable, {len(report['problems'])} shard "
          "problem(s)")  # fmt: skip
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["bad_rows"] or report["problems"] else 0
