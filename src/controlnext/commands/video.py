"""`controlnext video`: animate a reference image to follow a pose video (or a driving video's poses) with SVD."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError
from .generate import DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "video",
        help="pose-guided video from a reference image (Stable Video Diffusion + ControlNeXt)",
        description=(
            "Animate a reference image so that it follows a pose sequence: either an already drawn pose video "
            "(--pose-video) or the poses of a driving video (--driving-video, extracted with DWPose from local ONNX "
            "files and aligned to the reference body). Long sequences are generated in overlapping windows."
        ),
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument("--reference", required=True, help="reference image (the person to animate)")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--pose-video", help="drawn pose frames: a video file or a folder of images")
    src.add_argument("--driving-video", help="a video whose poses are extracted with DWPose (needs --dwpose-dir)")
    io.add_argument("-o", "--output", required=True, help="output .mp4/.gif, or a folder for PNG frames")
    io.add_argument("--reference-pose", default=None, help="with --pose-video: a pose image put before the poses")
    io.add_argument("--save-poses", default=None, help="also write the pose sequence used (video file or folder)")
    io.add_argument("--output-fps", type=float, default=None, help="default: the pose/driving video's rate")

    model = p.add_argument_group("models")
    model.add_argument("--model", default=None, help="base SVD pipeline folder or hub id (img2vid-xt layout; "
                       "default: the base model of a zoo --controlnext)")  # fmt: skip
    model.add_argument("--controlnext", required=True, help="control module: released controlnet.bin, file or "
                       "folder, or a zoo name (svd-v1, svd-v2: its files and recommended settings)")  # fmt: skip
    model.add_argument("--controlnext-variant", default=None, choices=["svd-v2", "svd"], help="default: detected")
    model.add_argument("--unet-weights", default=None, help="the released unet.bin (full SVD UNet) or a subset/deltas")
    model.add_argument("--allow-pickle", action="store_true", help="unpickle non-tensor .bin files (trusted only)")
    model.add_argument("--dwpose-dir", default=None, help="folder with yolox_l.onnx and dw-ll_ucoco_384.onnx, or "
                       "dwpose (the zoo entry's cached files)")  # fmt: skip

    pose = p.add_argument_group("poses")
    pose.add_argument("--sample-stride", type=int, default=2, help="use every n-th frame of the pose/driving video")
    pose.add_argument("--max-frames", type=int, default=None, help="at most this many frames (after the stride)")
    pose.add_argument("--no-align", action="store_true", help="do not align driving poses to the reference body")
    pose.add_argument("--pose-supersample", type=int, default=2160,
                      help="draw poses at this short side, then resize (as released); 0 draws at the output size, "
                           "which keeps strokes visible at small sizes")  # fmt: skip

    gen = p.add_argument_group("generation")
    gen.add_argument("--width", type=int, default=576)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the zoo entry's, else 25)")
    gen.add_argument("--guidance", type=float, default=None, help="sets both --min-guidance and --max-guidance "
                     "(default: the zoo entry's)")  # fmt: skip
    gen.add_argument("--min-guidance", type=float, default=None, help="default 2")
    gen.add_argument("--max-guidance", type=float, default=None, help="default 2")
    gen.add_argument("--frames-per-batch", type=int, default=14, help="window length")
    gen.add_argument("--overlap", type=int, default=4, help="frames shared by consecutive windows")
    gen.add_argument("--decode-chunk-size", type=int, default=2, help="frames per VAE decode call")
    gen.add_argument("--fps", type=int, default=7, help="SVD fps conditioning")
    gen.add_argument("--motion-bucket-id", type=int, default=127)
    gen.add_argument("--noise-aug", type=float, default=0.02, help="noise augmentation of the reference image")
    gen.add_argument("--control-scale", type=float, default=1.0)
    gen.add_argument("--control-level", type=float, default=None, help="default: the module's (0.2 for svd-v2)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    gen.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (less GPU memory)")
    p.set_defaults(func=run)


def _resolve_zoo(args: argparse.Namespace) -> None:
    """A zoo --controlnext brings its files, base model and settings where not given; --dwpose-dir dwpose its files."""
    from ..zoo import get_entry, resolve

    entry = get_entry(args.controlnext)
    if entry is not None:
        if entry.family != "svd":
            raise UserError(f"{entry.name} is not a video model: use `controlnext generate --controlnext {entry.name}`")
        _, module, unet = resolve(entry.name)
        args.controlnext = str(module)
        args.unet_weights = args.unet_weights or (str(unet) if unet else None)
        args.controlnext_variant = args.controlnext_variant or entry.variant
        args.model = args.model or entry.base_model
        args.steps = args.steps or entry.steps
        if args.guidance is None and args.min_guidance is None and args.max_guidance is None:
            args.guidance = entry.guidance
    if args.model is None:
        raise UserError("--model is required (an SVD folder or hub id) unless --controlnext is a zoo name")
    if args.dwpose_dir == "dwpose" and not Path("dwpose").is_dir():  # both files sit in one snapshot folder
        from ..zoo import download

        args.dwpose_dir = str(download("dwpose")[0].parent)
    args.steps = args.steps or 25
    if args.guidance is not None:
        args.min_guidance = args.max_guidance = args.guidance
    args.min_guidance = 2.0 if args.min_guidance is None else args.min_guidance
    args.max_guidance = 2.0 if args.max_guidance is None else args.max_guidance


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "frames_per_batch", "decode_chunk_size", "sample_stride"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    if not 0 <= args.overlap < args.frames_per_batch:
        raise UserError(f"--overlap must be in [0, --frames-per-batch), got {args.overlap}")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v < 64 or v % 64:
            raise UserError(f"--{name} must be a positive multiple of 64, got {v}")
    for name in ("reference", "reference_pose"):
        v = getattr(args, name)
        if v is not None and not Path(v).is_file():
            raise UserError(f"--{name.replace('_', '-')} image not found: {v}")
    src = args.pose_video or args.driving_video
    if not Path(src).exists():
        raise UserError(f"video not found: {src}")


def _save_frames(frames, path: Path, fps: float) -> Path:
    from ..video_io import VIDEO_EXTENSIONS, write_video

    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return write_video(frames, path, fps=fps)
    import PIL.Image

    from ..video_io import to_uint8_frames

    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(to_uint8_frames(frames)):
        PIL.Image.fromarray(frame).save(path / f"frame_{i:05d}.png")
    return path


def _pose_frames(args: argparse.Namespace, reference):
    """The control frames (RGB uint8 at the output size) and the frame rate of their source."""
    from ..video_io import read_video, resize_and_center_crop

    if args.pose_video:
        clip = read_video(args.pose_video, stride=args.sample_stride, max_frames=args.max_frames)
        frames = [resize_and_center_crop(f, args.width, args.height) for f in clip.frames]
        if args.reference_pose:
            import PIL.Image

            with PIL.Image.open(args.reference_pose) as im:
                frames.insert(0, resize_and_center_crop(im, args.width, args.height))
            frames = frames[: args.max_frames] if args.max_frames else frames
        return frames, clip.fps
    from ..pose import DWPoseDetector, driving_poses

    detector = DWPoseDetector(args.dwpose_dir)
    clip = read_video(args.driving_video, stride=args.sample_stride, max_frames=args.max_frames)
    frames = driving_poses(
        reference, clip.frames, detector, align=not args.no_align, supersample=args.pose_supersample or None
    )
    # The reference pose comes first (as released), so the sequence is one longer than the sampled frames.
    return list(frames[: args.max_frames] if args.max_frames else frames), clip.fps


def run(args: argparse.Namespace) -> int:
    import PIL.Image
    import torch

    from ..pipelines.svd import StableVideoDiffusionControlNeXtPipeline
    from ..video_io import resize_and_center_crop

    _resolve_zoo(args)
    _check(args)
    if args.driving_video and args.dwpose_dir is None:
        from ..pose import find_dwpose_files

        find_dwpose_files(None)  # raises the error that names the files and where to put them
    with PIL.Image.open(args.reference) as im:
        reference = resize_and_center_crop(im, args.width, args.height)
    poses, source_fps = _pose_frames(args, reference)
    if args.save_poses:
        print(_save_frames(poses, Path(args.save_poses), args.output_fps or source_fps or args.fps))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("float16" if device.startswith("cuda") else "float32")
    try:
        pipe = StableVideoDiffusionControlNeXtPipeline.from_published(
            args.model,
            args.controlnext,
            unet_weights=args.unet_weights,
            variant=args.controlnext_variant,
            torch_dtype=getattr(torch, dtype_name),
            allow_pickle=args.allow_pickle,
        )
    except OSError as err:
        raise UserError(f"could not load the base model {args.model!r}: {err}") from err
    if args.cpu_offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    frames = pipe(
        PIL.Image.fromarray(reference),
        poses,
        height=args.height,
        width=args.width,
        num_frames=len(poses),
        frames_per_batch=args.frames_per_batch,
        overlap=args.overlap,
        num_inference_steps=args.steps,
        min_guidance_scale=args.min_guidance,
        max_guidance_scale=args.max_guidance,
        fps=args.fps,
        motion_bucket_id=args.motion_bucket_id,
        noise_aug_strength=args.noise_aug,
        decode_chunk_size=args.decode_chunk_size,
        controlnext_conditioning_scale=args.control_scale,
        control_level=args.control_level,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        output_type="np",
    ).frames[0]
    print(_save_frames(frames, Path(args.output), args.output_fps or source_fps or args.fps))
    return 0
