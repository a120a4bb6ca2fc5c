"""`controlnext generate`: one image (or a batch) from a base model, a control module and a condition image."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..cli import UserError
from . import add_threads_option, torch_threads

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}
MAX_SIDE = 4096  # --height / --width
MAX_IMAGES = 64  # --num-images
FITS = ("crop", "pad", "stretch")  # as the web app offers them (controlnext.preprocess.fit_to_size)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with a ControlNeXt module",
        description="Generate images from a base model (SD1.5 or SDXL, folder or hub id) and a ControlNeXt module.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="base model folder or hub id (diffusers layout), or the shipped 64 px model: demo, demo:edges, demo:mask",
    )
    p.add_argument(
        "--controlnext",
        default=None,
        help="control module: save_pretrained folder, hub id, one file or demo:edges / demo:mask "
        "(default with a demo --model: its module)",
    )
    p.add_argument("--controlnext-variant", default=None, help="published variant, when a file's layout is ambiguous")
    p.add_argument("--unet-weights", default=None, help="trained UNet subset/deltas (.safetensors or .bin)")
    p.add_argument("--unet-weights-mode", default="auto", choices=["auto", "values", "deltas"])
    p.add_argument("--lora", default=None, help="LoRA weights (file or folder), loaded with diffusers")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--control-image", required=True, help="condition image (edges, mask, depth, pose...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--control-scale", type=float, default=1.0)
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the schedule where control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the schedule where control ends")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument(
        "--height", type=int, default=None, help="default: the demo model's native 64 px, else the condition's height"
    )
    p.add_argument(
        "--width", type=int, default=None, help="default: the demo model's native 64 px, else the condition's width"
    )
    p.add_argument(
        "--fit",
        choices=FITS,
        default="crop",
        help="how a condition of another size is fitted to the output: crop (keep the aspect, cut the sides; "
        "default), pad (keep the aspect, black bars) or stretch",
    )
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="default: the model's own")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    add_threads_option(p, None)
    p.add_argument("--allow-pickle", action="store_true", help="allow unpickling non-tensor .bin files (trusted only)")
    p.add_argument("-o", "--output", default="controlnext.png", help="output image path (numbered for batches)")
    p.set_defaults(func=run)


def _resolve_demo(args: argparse.Namespace) -> None:
    """Replace demo model names by the shipped files; a demo --model brings its module unless one is given."""
    from ..shapes.demo import demo_ref

    if (ref := demo_ref(args.model)) is not None:
        args.model = str(ref[0])
        args.controlnext = args.controlnext or str(ref[1])
    if args.controlnext is None:
        raise UserError("--controlnext is required (a control module folder, file or hub id) unless --model is demo")
    if (ref := demo_ref(args.controlnext)) is not None:
        args.controlnext = str(ref[1])


def _check(args: argparse.Namespace) -> None:
    from ..pipelines.common import MAX_CONTROL_SCALE, MAX_GUIDANCE_SCALE, check_number

    _resolve_demo(args)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if not 0 <= args.control_start < args.control_end <= 1:
        raise UserError("need 0 <= --control-start < --control-end <= 1")
    check_number("--control-scale", args.control_scale, 0.0, MAX_CONTROL_SCALE)
    check_number("--guidance", args.guidance, 0.0, MAX_GUIDANCE_SCALE)
    check_number("--lora-scale", args.lora_scale, -MAX_CONTROL_SCALE, MAX_CONTROL_SCALE)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 8 or v % 8 or v > MAX_SIDE):
            raise UserError(f"--{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}")
    if not Path(args.control_image).is_file():
        raise UserError(f"condition image not found: {args.control_image}")


def load_pipeline(model: str, device: str, dtype, controlnext: str, variant: str | None = None, **kw):
    """Build the right ControlNeXt pipeline for a base model folder/id and load the control module into it."""
    import diffusers

    from ..families import detect_family

    try:
        family = detect_family(model)
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        pipe = family.pipeline_class().from_pretrained(model, torch_dtype=dtype, **family.pipeline_kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the base model {model!r}: {err}") from err
    diffusers.utils.logging.set_verbosity_error()
    pipe.load_controlnext(controlnext, variant=variant, **kw)
    return pipe.to(device)


def is_demo_base(model: str) -> bool:
    """True when ``model`` is the shipped demo base folder (a model small enough that one CPU thread is fastest)."""
    from ..shapes.demo import demo_assets

    root = demo_assets()
    return root is not None and Path(model).expanduser().resolve() == (root / "base").resolve()


def warn(message: str) -> None:
    print(f"controlnext generate: warning: {message}", file=sys.stderr)


def output_size(args: argparse.Namespace, condition_size: tuple[int, int], native: int | None):
    """(width, height) to fit the condition to, or None to let the pipeline take the condition's size.

    ``native`` is the side the model was trained at when it is known to matter (the demo model); the stock models
    follow diffusers' ControlNet pipelines, which take the condition's size.
    """
    if args.width is None and args.height is None:
        if native is None or condition_size == (native, native):
            return None
        w, h = condition_size
        warn(
            f"the condition is {w}x{h} but the model was trained at {native}x{native}: fitted to it (--fit "
            f"{args.fit}); pass --width/--height for another size"
        )
        return native, native
    if args.width is None or args.height is None:
        return None  # one side given: the pipeline takes the other from the condition, as before
    return None if (args.width, args.height) == condition_size else (args.width, args.height)


def warn_unknown_words(prompt: str) -> None:
    """The demo model knows only the words of its captions; others are ignored noise to it."""
    from ..shapes.world import VOCABULARY

    unknown = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in VOCABULARY})
    if unknown:
        warn(
            f"the demo model does not know the word(s) {', '.join(unknown)}; it was trained on captions like "
            f"'a red circle on a white background' ({' '.join(VOCABULARY)})"
        )


def run(args: argparse.Namespace) -> int:
    _check(args)
    threads = args.threads if args.threads is not None or not is_demo_base(args.model) else 1
    with torch_threads(threads):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ..conditioning import load_condition
    from ..preprocess import fit_to_size, to_pil

    condition = load_condition(args.control_image)  # an unreadable or oversized file fails before the model loads
    demo = is_demo_base(args.model)
    if demo:
        warn_unknown_words(args.prompt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("float16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    pipe = load_pipeline(
        args.model, device, dtype, args.controlnext, args.controlnext_variant, allow_pickle=args.allow_pickle
    )
    if args.unet_weights:
        pipe.load_unet_weights(args.unet_weights, mode=args.unet_weights_mode, allow_pickle=args.allow_pickle)
    if args.lora:
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora(lora_scale=args.lora_scale)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor if demo else None
    size = output_size(args, (condition.shape[-1], condition.shape[-2]), native)
    if size is not None:
        condition = load_condition(fit_to_size(to_pil(args.control_image), *size, mode=args.fit))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            control_image=condition,
            controlnext_conditioning_scale=args.control_scale,
            control_guidance_start=args.control_start,
            control_guidance_end=args.control_end,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            generator=generator,
        ).images
    except (RuntimeError, MemoryError) as err:
        # torch.OutOfMemoryError (a RuntimeError) on GPUs; a RuntimeError "can't allocate memory" on the CPU
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(err):
            raise
        raise UserError(f"out of memory on {device}: lower --num-images or --height/--width") from None
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
        print(path)
    return 0
