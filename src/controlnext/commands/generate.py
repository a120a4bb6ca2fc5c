"""`controlnext generate`: images from a base model, one or more control modules and their condition images.

Text-to-image, image-to-image (``--image``, ``--strength``) and inpainting (``--image``, ``--mask``) through the
family's ControlNeXt pipelines (SD1.5, SDXL, SD3, Flux). A control module is a file, folder or hub id, a model-zoo
name (``controlnext models``: its cached files and recommended settings) or a demo name. Every PNG written carries
its settings (the web app's writer), and ``--from-png`` reads them back; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

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

# Defaults of the options a model-zoo entry or a --from-png file may set: the parser stores None, so that what the
# user typed can be told from a default (explicit flags win over the PNG, the PNG over the entry, the entry over these).
DEFAULTS: dict[str, Any] = {
    "steps": 30,
    "guidance": 7.5,
    "control_scale": [1.0],
    "control_start": 0.0,
    "control_end": 1.0,
    "seed": 0,
    "num_images": 1,
    "lora_scale": 1.0,
    "fit": "crop",
    "strength": 0.8,
    "unet_weights_mode": "auto",
    "output": "controlnext.png",
}


def _opt(p, *flags: str, help: str, **kw) -> None:
    """An option whose default lives in :data:`DEFAULTS` (shown in --help) and is applied after the PNG and zoo."""
    dest = kw.pop("dest", flags[-1].lstrip("-").replace("-", "_"))
    default = DEFAULTS[dest]
    shown = ", ".join(map(str, default)) if isinstance(default, list) else default
    p.add_argument(*flags, dest=dest, default=None, help=f"{help} (default: {shown})", **kw)


def register(sub: argparse._SubParsersAction) -> None:
    from ..preprocess.registry import REGISTRY

    p = sub.add_parser(
        "generate",
        help="generate images with ControlNeXt modules (text-to-image, image-to-image, inpainting)",
        description="Generate images from a base model (SD1.5, SDXL, SD3 or Flux: folder or hub id) and ControlNeXt "
        "modules. --controlnext, --control-image, --preprocess and --control-scale repeat, one per module. A "
        "model-zoo name (`controlnext models`) brings its base model, UNet weights and recommended scale and steps.",
    )
    models = p.add_argument_group("models")
    models.add_argument(
        "--model",
        default=None,
        help="base model folder or hub id (diffusers layout), or the shipped 64 px model: demo, demo:edges, "
        "demo:mask (default: the base model of a zoo --controlnext)",
    )
    models.add_argument(
        "--controlnext",
        action="append",
        default=None,
        help="control module (repeatable): save_pretrained folder, hub id, one file, a zoo name (`controlnext "
        "models`) or demo:edges / demo:mask (default with a demo --model: its module)",
    )
    models.add_argument("--controlnext-variant", default=None, help="published variant, when a file's layout is "
                        "ambiguous (default: detected from the file and the base model)")  # fmt: skip
    models.add_argument("--unet-weights", default=None, help="trained UNet subset/deltas (.safetensors or .bin; "
                        "default: the zoo entry's)")  # fmt: skip
    _opt(models, "--unet-weights-mode", choices=["auto", "values", "deltas"], help="how --unet-weights apply")
    models.add_argument("--lora", default=None, help="LoRA weights (file or folder), loaded with diffusers")
    _opt(models, "--lora-scale", type=float, help="strength of the fused LoRA")

    cond = p.add_argument_group("conditions and input images")
    cond.add_argument("--control-image", action="append", default=None,
                      help="condition image, one per --controlnext (one image is used for every module)")  # fmt: skip
    cond.add_argument(
        "--preprocess",
        action="append",
        default=None,
        choices=[name for name in REGISTRY],
        help="make the condition from a photo first with this preprocessor at its defaults (`controlnext "
        "preprocess KIND --help`), one per --control-image (default: none, the image is the condition)",
    )
    cond.add_argument("--image", default=None, help="initial image: image-to-image, or inpainting with --mask")
    _opt(cond, "--strength", type=float, help="with --image: how much of it is re-noised, 0..1")
    cond.add_argument("--mask", default=None, help="inpainting mask (white = repaint), with --image")
    _opt(cond, "--fit", choices=FITS, help="how a condition or image of another size is fitted to the output: "
         "crop (keep the aspect, cut the sides), pad (keep the aspect, black bars) or stretch")  # fmt: skip
    cond.add_argument("--from-png", default=None, metavar="FILE",
                      help="read the settings stored in a PNG written by controlnext (generate or web); flags given "
                      "here win")  # fmt: skip

    gen = p.add_argument_group("sampling")
    gen.add_argument("--prompt", default=None, help="the prompt (required unless --from-png gives one)")
    gen.add_argument("--negative-prompt", default=None)
    _opt(gen, "--steps", type=int, help="denoising steps (or the zoo entry's)")
    _opt(gen, "--guidance", type=float, help="classifier-free guidance scale (or the zoo entry's)")
    _opt(gen, "--control-scale", type=float, action="append",
         help="control strength in [0, 10], one per module or one for all (or the zoo entry's)")  # fmt: skip
    _opt(gen, "--control-start", type=float, help="fraction of the schedule where control starts")
    _opt(gen, "--control-end", type=float, help="fraction of the schedule where control ends")
    _opt(gen, "--seed", type=int, help="random seed")
    _opt(gen, "--num-images", type=int, help=f"images per prompt, up to {MAX_IMAGES}")
    gen.add_argument("--height", type=int, default=None,
                     help="default: the demo model's native 64 px, else the condition's height")  # fmt: skip
    gen.add_argument("--width", type=int, default=None,
                     help="default: the demo model's native 64 px, else the condition's width")  # fmt: skip
    gen.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="default: the model's own")

    run_ = p.add_argument_group("device and output")
    run_.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    run_.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    add_threads_option(run_, None)
    run_.add_argument("--allow-pickle", action="store_true", help="allow unpickling non-tensor .bin files "
                      "(trusted only)")  # fmt: skip
    _opt(run_, "-o", "--output", help="output image path (numbered for batches)")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- settings
def _from_png(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from a PNG's stored settings."""
    from ..web.generation import read_settings

    path = Path(args.from_png)
    if not path.is_file():
        raise UserError(f"--from-png {path}: no such file")
    try:
        s = read_settings(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--from-png {path}: {err}") from None
    scheduler = {v: k for k, v in SCHEDULERS.items()}.get(s.get("scheduler"))
    stored = {
        "prompt": s.get("prompt"),
        "negative_prompt": s.get("negative_prompt") or None,
        "steps": s.get("steps"),
        "guidance": s.get("guidance"),
        "control_scale": s.get("control_scales") or ([s["control_scale"]] if "control_scale" in s else None),
        "control_start": s.get("control_start"),
        "control_end": s.get("control_end"),
        "seed": s.get("seed"),
        "num_images": s.get("batch_size"),
        "width": s.get("width"),
        "height": s.get("height"),
        "model": s.get("base") or None,
        "controlnext": s.get("controlnext_list") or ([s["controlnext"]] if s.get("controlnext") else None),
        "controlnext_variant": s.get("controlnext_variant"),
        "unet_weights": s.get("unet_weights"),
        "unet_weights_mode": s.get("unet_weights_mode"),
        "lora": s.get("lora"),
        "lora_scale": s.get("lora_weight") if s.get("lora") else None,
        "control_image": s.get("control_images"),
        # generate's PNGs: one preprocessor (and its options) per module; the web app's: the one it applied
        "preprocess": s.get("preprocess") or ([s["preprocessor"]] if s.get("preprocessor") else None),
        "image": s.get("image"),
        "mask": s.get("mask"),
        "strength": s.get("strength"),
        "fit": s.get("fit"),
        "scheduler": scheduler,
    }
    condition = _web_condition(path, s)
    if args.control_image is None and condition is not None:  # the web app's processed condition, next to its PNG
        args.control_image = [condition]
        args.preprocess = args.preprocess or ["none"]
    if args.preprocess is None and stored["preprocess"] is not None:  # the options go with the stored preprocessors
        args.preprocess_options = s.get("preprocess_options") or [s.get("preprocessor_options") or {}]
    for name, value in stored.items():
        if getattr(args, name) is None and value is not None:
            setattr(args, name, value)
    args.stored_unet_files = s.get("unet_files")


def _web_condition(png: Path, s: dict[str, Any]) -> str | None:
    """The condition the web app saved beside a result (its name pattern, in the PNG's folder, the recorded hash)."""
    import hashlib

    name, sha = s.get("condition_file"), s.get("condition_sha256")
    if not isinstance(name, str) or not re.fullmatch(r"\d{5}-condition\.png", name) or not isinstance(sha, str):
        return None
    path = png.parent / name
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
        return str(path)
    return None


def _resolve_names(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Replace demo and zoo names by their files; returns the (UNet weights, mode) files to apply, in order.

    A demo --model brings its module unless one is given; a zoo module brings its base model (when --model is not
    given), its UNet file and its recommended scale, steps and guidance (where those are not given).
    """
    from ..shapes.demo import demo_ref, demo_sampling, demo_unet_weights
    from ..zoo import get_entry, resolve

    if args.model is not None and (ref := demo_ref(args.model)) is not None:
        args.controlnext = args.controlnext or [args.model]  # resolved below, with its UNet weights
        args.model = str(ref[0])
        # The demo model's own sampling settings, as `controlnext demo` and the web app use them.
        args.steps, args.guidance = demo_sampling(args.steps, args.guidance)
    unet_files = []
    entries = []
    scales = [1.0] * len(args.controlnext or [])  # the recommended scale of each zoo module, 1 for the others
    for i, name in enumerate(args.controlnext or []):
        if (ref := demo_ref(name)) is not None:
            args.controlnext[i] = str(ref[1])
            # The demo modules ship with UNet `to_out` deltas (the published recipe): a demo name brings both.
            if args.unet_weights is None and (weights := demo_unet_weights(ref[1])) is not None:
                unet_files.append((str(weights), "auto"))
        elif get_entry(name) is not None:
            entry, module, unet = resolve(name)
            if entry.family is not None and entry.family not in ("sd15", "sdxl", "sd3", "flux"):
                raise UserError(f"{name} is a {entry.family} (video) model: use `controlnext video --controlnext "
                                f"{name}`")  # fmt: skip
            args.controlnext[i] = str(module)
            entries.append(entry)
            scales[i] = entry.scale if entry.scale is not None else 1.0
            if unet is not None and args.unet_weights is None:
                unet_files.append((str(unet), entry.unet_mode or "auto"))
    if entries:
        first = entries[0]
        args.model = args.model or first.base_model
        args.control_scale = args.control_scale or scales
        args.steps = args.steps if args.steps is not None else first.steps
        args.guidance = args.guidance if args.guidance is not None else first.guidance
    if args.model is None:
        raise UserError("--model is required (a diffusers folder or hub id, or demo) unless --controlnext is a zoo "
                        "name")  # fmt: skip
    if not args.controlnext:
        raise UserError("--controlnext is required (a control module folder, file, hub id or zoo name) unless --model "
                        "is demo")  # fmt: skip
    if args.unet_weights is not None:
        unet_files.append((args.unet_weights, args.unet_weights_mode or "auto"))
    stored = getattr(args, "stored_unet_files", None)
    if stored and args.unet_weights is None:
        # --from-png: the UNet files the PNG's run applied (a demo or zoo module's own, already resolved to files)
        unet_files = [(str(p), str(m)) for p, m in stored]
    args.applied_unet_files = unet_files
    return unet_files


def _per_module(values: list | None, n: int, flag: str) -> list:
    """One value per module: as given, or one value repeated; anything else is an error naming the flag."""
    values = list(values or [])
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"give one {flag} for all modules or one per --controlnext ({n}), got {len(values)}")
    return values


def _check(args: argparse.Namespace) -> list[tuple[str, str]]:
    from ..pipelines.common import MAX_CONTROL_SCALE, MAX_GUIDANCE_SCALE, check_number
    from ..preprocess import get_preprocessor

    if args.from_png:
        _from_png(args)
    unet_files = _resolve_names(args)
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    if args.prompt is None:
        raise UserError("--prompt is required (or --from-png with a PNG that records one)")
    n = len(args.controlnext)
    if args.control_image is None:
        raise UserError("--control-image is required (one condition image per --controlnext)")
    args.control_image = _per_module(args.control_image, n, "--control-image")
    args.control_scale = _per_module(args.control_scale, n, "--control-scale")
    args.preprocess = _per_module(args.preprocess or ["none"], n, "--preprocess")
    given = getattr(args, "preprocess_options", None) or [{}]  # only --from-png sets options: the CLI takes defaults
    args.preprocess_options = [
        get_preprocessor(kind).parse(opts) for kind, opts in zip(args.preprocess, _per_module(given, n, "options"))
    ]
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if not 0 <= args.control_start < args.control_end <= 1:
        raise UserError("need 0 <= --control-start < --control-end <= 1")
    for scale in args.control_scale:
        check_number("--control-scale", scale, 0.0, MAX_CONTROL_SCALE)
    check_number("--guidance", args.guidance, 0.0, MAX_GUIDANCE_SCALE)
    check_number("--lora-scale", args.lora_scale, -MAX_CONTROL_SCALE, MAX_CONTROL_SCALE)
    check_number("--strength", args.strength, 0.0, 1.0)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 8 or v % 8 or v > MAX_SIDE):
            raise UserError(f"--{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}")
    for path in args.control_image:
        if not Path(path).is_file():
            raise UserError(f"condition image not found: {path}")
    if args.mask is not None and args.image is None:
        raise UserError("--mask needs --image (the picture to inpaint)")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    return unet_files


def load_pipeline(model: str, device: str, dtype, controlnext, variant: str | None = None, task: str = "text2img",
                  **kw):  # fmt: skip
    """Build the family's ControlNeXt pipeline for ``task`` from a base model folder/id and load the module(s)."""
    import diffusers

    from ..families import detect_family

    try:
        family = detect_family(model)
    except ValueError as err:
        from huggingface_hub import constants

        from ..sources import HUB_ID

        if constants.HF_HUB_OFFLINE and HUB_ID.match(str(model)) and not Path(model).exists():
            raise UserError(f"the base model {model} is not in the hub cache and HF_HUB_OFFLINE is set: fetch it "
                            f"with `hf download {model}` where there is network, or give a local folder") from None
        raise UserError(str(err)) from err
    try:
        pipe = family.pipeline_class(task).from_pretrained(model, torch_dtype=dtype, **family.pipeline_kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the base model {model!r}: {err}") from err
    diffusers.utils.logging.set_verbosity_error()
    for module in [controlnext] if isinstance(controlnext, (str, Path)) else controlnext:
        pipe.load_controlnext(module, variant=variant, **kw)
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
    given = {"model": args.model, "controlnext": list(args.controlnext or [])}  # names as typed, for the PNGs
    unet_files = _check(args)
    if args.from_png:  # names the PNG brought
        given = {"model": given["model"] or args.model, "controlnext": given["controlnext"] or args.controlnext}
    threads = args.threads if args.threads is not None or not is_demo_base(args.model) else 1
    with torch_threads(threads):
        return _generate(args, unet_files, given)


def _native_side(model: str) -> int:
    """The pixel side a base folder was trained at: its UNet's sample size times the VAE's downsampling factor."""
    import json

    unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _conditions(args: argparse.Namespace, native: int | None) -> tuple[list, tuple[int, int] | None]:
    """One condition tensor per module (preprocessed and fitted), and the (width, height) they were fitted to."""
    from .. import preprocess as pp
    from ..conditioning import load_condition

    images = []
    for path, kind, options in zip(args.control_image, args.preprocess, args.preprocess_options):
        condition = load_condition(path)  # an unreadable or oversized file fails before anything else runs
        images.append(pp.get_preprocessor(kind).run(pp.open_image(path), options) if kind != "none" else None)
        if images[-1] is not None:
            condition = load_condition(images[-1])
        images[-1] = (images[-1], (condition.shape[-1], condition.shape[-2]), path)
    size = output_size(args, images[0][1], native)
    if size is None and len({s for _, s, _ in images}) > 1:
        size = images[0][1]  # several conditions of different sizes: all fitted to the first one's
    out = []
    for pil, cond_size, path in images:
        source = pil if pil is not None else path
        if size is not None and cond_size != size:
            source = pp.fit_to_size(pp.to_pil(source), *size, mode=args.fit)
        out.append(load_condition(source))
    return out, size


def _task_inputs(args: argparse.Namespace, size: tuple[int, int]) -> dict[str, Any]:
    """The init image (and mask) of image-to-image / inpainting, fitted to the output size."""
    from .. import preprocess as pp

    if args.image is None:
        return {}
    inputs = {"image": pp.fit_to_size(pp.open_image(args.image), *size, mode=args.fit), "strength": args.strength}
    if args.mask is not None:
        inputs["mask_image"] = pp.fit_to_size(pp.open_image(args.mask).convert("L"), *size, mode=args.fit)
    return inputs


def _accepted(pipe, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the ones the pipeline's call does not take (SD img2img has no height/width)."""
    params = inspect.signature(type(pipe).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _generate(args: argparse.Namespace, unet_files: list[tuple[str, str]], given: dict[str, Any]) -> int:
    import torch

    demo = is_demo_base(args.model)
    if demo:
        warn_unknown_words(args.prompt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("float16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    task = "inpaint" if args.mask else "img2img" if args.image else "text2img"
    native = _native_side(args.model) if demo else None
    conditions, size = _conditions(args, native)
    pipe = load_pipeline(
        args.model, device, dtype, args.controlnext, args.controlnext_variant, task, allow_pickle=args.allow_pickle
    )
    for path, mode in unet_files:
        pipe.load_unet_weights(path, mode=mode, allow_pickle=args.allow_pickle)
    if args.lora:
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora(lora_scale=args.lora_scale)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    width, height = size if size is not None else (args.width, args.height)
    if args.image is not None:
        c = conditions[0]
        fitted = (width or c.shape[-1], height or c.shape[-2])
        extra = _task_inputs(args, fitted)
        width, height = fitted
    else:
        extra = {}
    # One generator per image, seeded seed, seed + 1, ... as the web app does: each PNG records its own seed, so
    # `--from-png` remakes that one image.
    seeds = [args.seed + i for i in range(args.num_images)]
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    one = len(conditions) == 1
    kwargs = dict(
        negative_prompt=args.negative_prompt,
        control_image=conditions[0] if one else conditions,
        controlnext_conditioning_scale=args.control_scale[0] if one else args.control_scale,
        control_guidance_start=args.control_start,
        control_guidance_end=args.control_end,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        height=height,
        width=width,
        generator=generators if len(generators) > 1 else generators[0],
        **extra,
    )
    try:
        images = pipe(args.prompt, **_accepted(pipe, kwargs)).images
    except (RuntimeError, MemoryError) as err:
        # torch.OutOfMemoryError (a RuntimeError) on GPUs; a RuntimeError "can't allocate memory" on the CPU
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(err):
            raise
        raise UserError(f"out of memory on {device}: lower --num-images or --height/--width") from None
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for i, (img, path) in enumerate(zip(images, paths)):
        _save(img, path, args, given, type(pipe.scheduler).__name__, i, seeds[i])
        print(path)
    return 0


def _save(img, path: Path, args, given: dict[str, Any], scheduler: str, index: int, seed: int) -> None:
    """Write one result; a PNG records every setting (the web app's writer), readable by ``--from-png``."""
    if path.suffix.lower() != ".png":
        img.save(path)
        return
    from ..web.generation import GenerationSettings, save_png

    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt or "", steps=args.steps, guidance=args.guidance,
        control_scale=args.control_scale[0], control_start=args.control_start, control_end=args.control_end,
        seed=seed, batch_size=1, width=img.width, height=img.height,
        base=given["model"] or args.model, controlnext=(given["controlnext"] or args.controlnext)[0], lora=args.lora,
        lora_weight=args.lora_scale, preprocessor=args.preprocess[0],
        preprocessor_options=args.preprocess_options[0], scheduler=scheduler,
    )  # fmt: skip
    extra = {
        "command": "generate",
        "index": index,
        "controlnext_list": given["controlnext"] or args.controlnext,
        "control_scales": args.control_scale,
        "control_images": [str(Path(p).resolve()) for p in args.control_image],
        "preprocess": args.preprocess,
        "preprocess_options": args.preprocess_options,
        "controlnext_variant": args.controlnext_variant,
        "unet_weights": args.unet_weights,
        "unet_weights_mode": args.unet_weights_mode,
        "unet_files": [list(f) for f in getattr(args, "applied_unet_files", [])],  # what was applied, in order
        "fit": args.fit,
        "image": str(Path(args.image).resolve()) if args.image else None,
        "mask": str(Path(args.mask).resolve()) if args.mask else None,
        "strength": args.strength if args.image else None,
    }
    save_png(img, path, settings, extra)
