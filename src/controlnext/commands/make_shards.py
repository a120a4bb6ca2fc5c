"""``controlnext make-shards``: write a dataset as WebDataset tar shards, optionally as a latent + text cache."""

from __future__ import annotations

import argparse


def _data_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say how rows are read (the same names as ``controlnext train``'s)."""
    p.add_argument("--image-column", default="image", help="column of the target images (default: image)")
    p.add_argument("--condition-column", default="conditioning_image",
                   help="column of the condition images (default: conditioning_image)")  # fmt: skip
    p.add_argument("--caption-column", default="text", help="column of the captions (default: text)")
    p.add_argument("--dataset-split", default="train", help="dataset split (default: train)")
    p.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    p.add_argument("--cache-dir", default=None, help="cache folder for hub datasets")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-shards",
        help="write a dataset as tar shards (or a latent/text-embedding cache) to stream in training",
        description=(
            "Read a dataset in any format `controlnext train --dataset` reads (imagefolder with metadata.jsonl/csv, "
            "saved dataset, parquet, hub id), check every row, and write WebDataset tar shards (KEY.image.EXT, "
            "KEY.conditioning_image.EXT, KEY.txt; image bytes copied unchanged) plus shards.json (sample counts). "
            "With --cache-latents, the base model's VAE and text encoders run once per row and the shards hold "
            "their outputs instead of the images and captions. Bad rows are skipped and listed."
        ),
    )
    p.add_argument("source", help="the dataset to convert")
    p.add_argument("out", help="output folder (created; must hold no shards yet)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default: 1000)")
    p.add_argument("--workers", type=int, default=8,
                   help="threads reading rows ahead (default: 8; the cache encodes in this process)")  # fmt: skip
    _data_arguments(p)
    cache = p.add_argument_group("latent and text-embedding cache")
    cache.add_argument("--cache-latents", action="store_true",
                       help="store VAE latents and text embeddings instead of images and captions")  # fmt: skip
    cache.add_argument("--base", help="base model whose encoders make the cache (a diffusers folder or hub id)")
    cache.add_argument("--resolution", type=int, default=None,
                       help="training size the images are centre-cropped to (default: the family's)")  # fmt: skip
    cache.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                       help="dtype the encoders run in; train with the same (default: no, float32)")  # fmt: skip
    cache.add_argument("--cpu", action="store_true", help="run the encoders on the CPU even if a GPU is present")
    cache.add_argument("--max-sequence-length", type=int, default=None,
                       help="SD3/Flux: T5 tokens per caption; train with the same (default: the stock pipeline's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..cli import UserError
    from ..training.data import ColumnNames, open_source, scan_rows
    from ..training.shards import sample_members, write_shards

    if args.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}.")
    if args.cache_latents and not args.base:
        raise UserError("--cache-latents needs --base MODEL (the base model whose VAE and text encoders to run).")
    if args.base and not args.cache_latents:
        raise UserError("--base is only used with --cache-latents.")
    source = open_source(args.source, ColumnNames(args.image_column, args.condition_column, args.caption_column),
                         args.dataset_split, args.dataset_config, args.cache_dir)  # fmt: skip
    scan = scan_rows(source)
    print(f"{source.description}: {len(scan.good)} usable rows" + (f", {len(scan.bad)} bad" if scan.bad else ""))
    out = Path(args.out)
    cache, columns, encode = None, None, sample_members
    if args.cache_latents:
        from ..training.cache import CACHE_COLUMNS, cache_identity, write_empty_prompt

        builder = _cache_builder(args)
        out.mkdir(parents=True, exist_ok=True)
        cache = {**cache_identity(builder.base, builder.resolution, builder.tokens),
                 "empty_prompt": write_empty_prompt(out, builder.empty_prompt())}  # fmt: skip
        columns, encode = dict(CACHE_COLUMNS), builder.members
        print(f"cache: {builder.base.family} encoders of {args.base} in {cache['vae']['dtype']} at "
              f"{builder.resolution} px")  # fmt: skip
    index = write_shards((lambda i=i: encode(source.raw(i)) for i in scan.good), out, len(scan.good),
                         args.samples_per_shard, cache=cache, columns=columns,
                         workers=1 if args.cache_latents else args.workers)  # fmt: skip
    bad = scan.bad + index["bad_rows"]
    for row_id, why in bad[:20]:
        print(f"  skipped row {row_id}: {why}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more")
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shard(s) to {out}"
          + (f"; {len(bad)} bad row(s) skipped" if bad else ""))  # fmt: skip
    return 0


def _cache_builder(args: argparse.Namespace):
    import torch

    from ..cli import UserError
    from ..families import get_family
    from ..shapes.demo import demo_ref
    from ..training.base import load_base_model
    from ..training.cache import CacheBuilder, encoder_dtypes

    base_path = str(ref[0]) if (ref := demo_ref(args.base)) is not None else args.base
    base = load_base_model(base_path)
    fam = get_family(base.family)
    resolution = args.resolution or fam.resolution
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1) * fam.latent_patch  # whole transformer patches
    if resolution % factor or resolution < factor:
        raise UserError(f"--resolution must be a positive multiple of {factor} (the VAE's downsampling"
                        f"{' and patch size' if fam.latent_patch > 1 else ''}), got {resolution}.")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if weight_dtype == torch.float16 and device.type == "cpu":
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")
    vae_dtype, text_dtype = encoder_dtypes(base.family, weight_dtype)
    base.vae.to(device, vae_dtype)
    for encoder in base.text_encoders:
        encoder.to(device, text_dtype)
    from ..training.cache import text_tokens

    if args.max_sequence_length is not None and get_family(base.family).denoiser != "transformer":
        raise UserError(f"--max-sequence-length is for the SD3/Flux (T5) families; {args.base} is {base.family}.")
    return CacheBuilder(base, resolution, device, text_tokens(base, args.max_sequence_length))
