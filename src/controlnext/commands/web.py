"""`controlnext web`: serve the gradio app (local only by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError
from . import add_threads_option, deprecated_alias, torch_threads


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "web",
        help="open the web app (upload a condition, preview, generate, download)",
        description="Serve the ControlNeXt web app. It binds 127.0.0.1 (this machine only) unless --host says "
        "otherwise, and makes no public link unless --share is given. Without --model it opens on the shipped "
        "demo model (offline).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also create a public gradio share link (off by default)")
    p.add_argument("--model", action="append", default=[], help="base model folder, .safetensors file or hub id")
    p.add_argument(
        "--controlnext", action="append", default=[], help="control module for the --model at the same position"
    )
    p.add_argument("--lora", default=None, help="LoRA file or folder applied to the given --model(s)")
    p.add_argument("--lora-scale", dest="lora_weight", type=float, default=1.0,
                   help="strength of the LoRA (default 1)")  # fmt: skip
    deprecated_alias(p, "--lora-weight", "--lora-scale", dest="lora_weight", type=float)
    p.add_argument("--size", default=None, metavar="WxH", help="default output size for the given --model(s)")
    p.add_argument("--output-dir", dest="outputs", default="controlnext-outputs",
                   help="results folder (default ./controlnext-outputs)")  # fmt: skip
    deprecated_alias(p, "--outputs", "--output-dir", dest="outputs")
    p.add_argument("--dwpose-dir", dest="pose_models", default=None,
                   help="folder with yolox_l.onnx and dw-ll_ucoco_384.onnx (DWPose)")  # fmt: skip
    deprecated_alias(p, "--pose-models", "--dwpose-dir", dest="pose_models")
    p.add_argument("--depth-model", default=None, help="local transformers depth-estimation model folder")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="upload size limit (default 20)")
    p.add_argument(
        "--max-side", type=int, default=None, help="largest output width/height (default 2048 on GPU, 768 on CPU)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget of one request; a generation still running then stops with a message (default 600)",
    )
    p.add_argument(
        "--upload-max-age",
        type=int,
        default=3600,
        help="seconds before uploads are deleted from gradio's cache (default 3600)",
    )
    p.add_argument(
        "--allow-model-paths",
        action="store_true",
        help="let page users type model paths even when the app is reachable from other machines",
    )
    add_threads_option(p, None)
    p.add_argument("--no-demo", action="store_true", help="do not offer the demo/tiny models")
    p.add_argument("--video-model", default=None, help="SVD base folder or hub id for the video tab")
    p.add_argument("--video-controlnext", default=None, help="control module for --video-model (controlnet.bin)")
    p.add_argument("--video-unet-weights", default=None, help="released full SVD UNet (unet.bin) for --video-model")
    p.add_argument("--max-video-frames", type=int, default=64, help="longest clip the video tab makes (default 64)")
    p.set_defaults(func=run)


def _web_app():
    """The :mod:`controlnext.web.app` module; without gradio, a one-line error naming the extra to install."""
    try:
        from ..web import app
    except ImportError as err:
        if (err.name or "").partition(".")[0] != "gradio":
            raise
        raise UserError('the web app needs gradio: pip install "controlnext[web]"') from None
    return app


def _demo_spec(model: str, control: str | None):
    """The shipped demo's preset for a demo --model name (its module, or the demo module named by ``control``)."""
    from dataclasses import replace

    from ..shapes.demo import demo_ref
    from ..web.models import demo_models, validate_control_ref

    if demo_ref(model) is None:
        return None
    kind = (control if control is not None and demo_ref(control) is not None else model).partition(":")[2] or "edges"
    spec = next(d for d in demo_models() if d.label.endswith(f"({kind})"))
    if control is None or demo_ref(control) is not None:
        return spec
    # another module on the demo base: the demo's UNet deltas belong to its own module only
    return replace(spec, label=f"shapes demo + {Path(control).name}", controlnext=validate_control_ref(control),
                   unet_weights=None)  # fmt: skip


def _zoo_module(control: str | None) -> tuple[str | None, dict]:
    """A zoo --controlnext: its cached module file and the preset settings it brings (steps, guidance, UNet)."""
    from ..zoo import get_entry, resolve

    if control is None or get_entry(control) is None:
        return control, {}
    entry, module, unet = resolve(control)
    preset = {k: v for k, v in (("steps", entry.steps), ("guidance", entry.guidance)) if v is not None}
    if unet is not None:  # applied as values or deltas, as the zoo says (loading.unet_weights_mode)
        preset["unet_weights"] = str(unet)
    return str(module), preset


def build_config(args: argparse.Namespace):
    """The :class:`~controlnext.web.app.WebConfig` for parsed ``controlnext web`` arguments."""
    WebConfig = _web_app().WebConfig
    from ..web.limits import Limits
    from ..web.models import ModelSpec, default_model, demo_models, validate_base_ref, validate_control_ref

    if len(args.controlnext) > len(args.model):
        raise UserError("give one --model for each --controlnext (pair them by position)")
    width = height = 512
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size must look like 512x768, got {args.size!r}") from None
    specs = []
    for i, model in enumerate(args.model):
        control = args.controlnext[i] if i < len(args.controlnext) else None
        if (demo := _demo_spec(model, control)) is not None:
            specs.append(demo)
            continue
        base = validate_base_ref(model)
        control, zoo = _zoo_module(control)
        control = validate_control_ref(control)
        specs.append(
            ModelSpec(
                label=f"{Path(base).name or base}" + (f" + {Path(control).name}" if control else ""),
                base=base,
                controlnext=control,
                width=width,
                height=height,
                lora=args.lora,
                lora_weight=args.lora_weight,
                **zoo,
            )
        )
    if not args.no_demo:
        specs += [d for d in demo_models() or [default_model()] if d not in specs]
    if not specs:
        raise UserError("--no-demo needs at least one --model")
    overrides = {"max_side": args.max_side, "max_seconds": args.max_seconds}
    limits = Limits.for_device(
        max_upload_mb=args.max_upload_mb, **{k: v for k, v in overrides.items() if v is not None}
    )
    if limits.max_side < limits.min_side or limits.max_seconds <= 0:
        raise UserError(
            f"--max-side must be at least {limits.min_side} and --max-seconds positive, "
            f"got {limits.max_side} and {limits.max_seconds:g}"
        )
    if args.upload_max_age < 1:
        raise UserError(f"--upload-max-age must be at least 1 second, got {args.upload_max_age}")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    video = None
    if args.video_model:
        from ..web.video import VideoSpec

        if not args.video_controlnext:
            raise UserError("--video-model needs --video-controlnext (the control module for it)")
        video = VideoSpec(
            label=Path(args.video_model).name or args.video_model,
            base=args.video_model,
            controlnext=args.video_controlnext,
            unet_weights=args.video_unet_weights,
            width=576,
            height=1024,
            steps=25,
        )
    return WebConfig(
        host=args.host,
        port=args.port,
        share=args.share,
        models=specs,
        outputs=Path(args.outputs),
        limits=limits,
        allow_custom_models=True if args.allow_model_paths else None,
        pose_models=Path(args.pose_models) if args.pose_models else None,
        depth_model=Path(args.depth_model) if args.depth_model else None,
        video_model=video,
        max_video_frames=args.max_video_frames,
        upload_max_age=args.upload_max_age,
    )


def run(args: argparse.Namespace) -> int:
    app = _web_app()
    config = build_config(args)
    if not app.is_local_host(config.host):
        print(f"warning: serving on {config.host}: other machines can reach this app.")
    print(app.describe(config))
    # Without --model the app serves only the demo models, which run fastest on one thread.
    with torch_threads(args.threads if args.threads is not None or args.model else 1):
        app.launch(config, block=True)
    return 0
