"""The video tab: a reference image animated by a pose video (Stable Video Diffusion + ControlNeXt).

It calls :class:`controlnext.pipelines.svd.StableVideoDiffusionControlNeXtPipeline` the way ``controlnext video``
does: the pose video's frames (every ``stride``-th, at most ``frames``) are fitted to the output size, the
reference's own pose goes first when the poses are extracted with DWPose, and the clip is written as MP4 into the
outputs folder with its settings in a JSON file beside it. Without a configured SVD model the tab uses a tiny
random SVD model, so the tab works offline (its clips are noise).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .generation import GenerationStopped
from .limits import user_error
from .security import UploadRecord

__all__ = [
    "TINY_SVD",
    "VideoSpec",
    "VideoSettings",
    "build_video_tab",
    "load_video_pipeline",
    "missing_modules",
    "video_available",
]

TINY_SVD = "tiny-random-svd"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")


# What the tab needs beyond the `web` extra, all from the `video` extra: MP4 reading and writing, and DWPose.
VIDEO_EXTRA = 'pip install "controlnext[video]"'
VIDEO_MODULES = ("imageio", "imageio_ffmpeg")
DWPOSE_MODULES = ("onnxruntime",)


def missing_modules(names: tuple[str, ...] = VIDEO_MODULES) -> list[str]:
    """The modules of ``names`` that cannot be imported here (looked up, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _needs_extra(what: str, missing: list[str]) -> str:
    names = ", ".join(m.replace("_", "-") for m in missing)
    return (
        f"{what} needs the `video` extra, which is not installed here (missing: {names}). Install it with "
        f"`{VIDEO_EXTRA}` and restart the app."
    )


def video_available() -> bool:
    """True when the ControlNeXt video pipeline module is installed."""
    try:
        return importlib.util.find_spec("controlnext.pipelines.svd") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class VideoSpec:
    """An SVD base (folder or hub id), its control module, and optionally the released full UNet weights."""

    label: str = "tiny random SVD model (offline test model)"
    base: str = TINY_SVD
    controlnext: str | None = TINY_SVD
    unet_weights: str | None = None
    width: int = 64
    height: int = 64
    steps: int = 4


@dataclass
class VideoSettings:
    """The settings of one clip (saved as JSON beside it)."""

    frames: int = 8
    stride: int = 2
    width: int = 64
    height: int = 64
    steps: int = 4
    min_guidance: float = 2.0
    max_guidance: float = 2.0
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug: float = 0.02
    control_scale: float = 1.0
    seed: int = 0
    frames_per_batch: int = 14
    overlap: int = 4
    pose_source: str = "drawn poses"

    def validate(self, max_frames: int, max_side: int) -> None:
        checks = [
            (1 <= self.frames <= max_frames, f"Frames must be between 1 and {max_frames}, got {self.frames}."),
            (1 <= self.stride <= 16, f"Frame stride must be between 1 and 16, got {self.stride}."),
            (1 <= self.steps <= 100, f"Steps must be between 1 and 100, got {self.steps}."),
            (
                0 <= self.min_guidance <= self.max_guidance <= 20,
                "Need 0 <= min guidance <= max guidance <= 20.",
            ),
            (
                0 <= self.overlap < self.frames_per_batch,
                f"Overlap must be below the window length ({self.frames_per_batch}), got {self.overlap}.",
            ),
            (0 <= self.control_scale <= 5, f"Control scale must be between 0 and 5, got {self.control_scale}."),
        ]
        for name in ("width", "height"):
            v = getattr(self, name)
            checks.append(
                (64 <= v <= max_side and v % 64 == 0, f"{name.capitalize()} must be a multiple of 64 up to {max_side}.")
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def load_video_pipeline(spec: VideoSpec):
    """The video pipeline for ``spec`` on the best device (tiny random model for :data:`TINY_SVD`)."""
    import torch

    from ..pipelines.svd import StableVideoDiffusionControlNeXtPipeline
    from ..testing import tiny_controlnext, tiny_svd_components

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.base == TINY_SVD:
        pipe = StableVideoDiffusionControlNeXtPipeline(**tiny_svd_components(), controlnext=tiny_controlnext("svd-v2"))
    else:
        dtype = torch.float16 if device == "cuda" else torch.float32
        try:
            pipe = StableVideoDiffusionControlNeXtPipeline.from_published(
                spec.base, spec.controlnext, unet_weights=spec.unet_weights, torch_dtype=dtype
            )
        except OSError as err:
            raise FileNotFoundError(f"Could not load the SVD model {spec.base!r}: {err}") from err
    pipe.set_progress_bar_config(desc="denoising")
    return pipe.to(device)


class VideoTab:
    """State and handlers of the video tab."""

    def __init__(
        self,
        config: Any,
        uploads: UploadRecord | None = None,
        stop_reason: Callable[[float], str | None] | None = None,
    ):
        self.config = config
        self.uploads = uploads or UploadRecord()
        self.stop_reason = stop_reason or (lambda started: None)
        self.spec: VideoSpec = getattr(config, "video_model", None) or VideoSpec()
        self.max_frames: int = getattr(config, "max_video_frames", 64)
        self._pipe = None
        self._lock = threading.Lock()
        self.missing = missing_modules()  # the tab says so, and refuses to run, while any is missing

    def pipe(self):
        with self._lock:
            if self._pipe is None:
                self._pipe = load_video_pipeline(self.spec)
            return self._pipe

    def pose_frames(self, video: str, settings: VideoSettings, reference) -> tuple[list, float]:
        from ..video_io import read_video, resize_and_center_crop

        if Path(video).suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"Upload the pose video as {', '.join(VIDEO_SUFFIXES)}; got {Path(video).suffix or '?'}.")
        missing = missing_modules(DWPOSE_MODULES) if settings.pose_source != "drawn poses" else []
        if missing:
            raise ValueError(_needs_extra("Extracting poses with DWPose", missing))
        try:
            clip = read_video(video, stride=settings.stride, max_frames=settings.frames)
        except Exception as err:  # imageio/ffmpeg raise many types for broken files
            raise ValueError(f"Cannot read the pose video: {str(err).splitlines()[0] if str(err) else err}") from None
        if settings.pose_source == "drawn poses":
            return [resize_and_center_crop(f, settings.width, settings.height) for f in clip.frames], clip.fps
        from ..pose import DWPoseDetector, driving_poses

        detector = DWPoseDetector(getattr(self.config, "pose_models", None))
        frames = driving_poses(reference, clip.frames, detector, include_reference=True, progress=True)
        return list(frames[: settings.frames]), clip.fps

    def generate(self, reference, video, *values, progress=gr.Progress(track_tqdm=True)):
        import PIL.Image
        import torch

        from ..video_io import resize_and_center_crop, write_video
        from .generation import resolve_seed
        from .limits import load_upload

        started = time.monotonic()
        try:
            reference_path, video = self.uploads.path(reference), self.uploads.path(video)
            if self.missing:
                raise ValueError(_needs_extra("The Video tab", self.missing))
            if not reference_path:
                raise ValueError("Upload a reference image.")
            if not video:
                raise ValueError("Upload a pose video.")
            *numbers, randomize, pose_source = values
            names = [
                "frames", "stride", "width", "height", "steps", "min_guidance", "max_guidance", "fps",
                "motion_bucket_id", "noise_aug", "control_scale", "seed", "frames_per_batch", "overlap",
            ]  # fmt: skip
            kw = dict(zip(names, numbers))
            kw["seed"] = resolve_seed(kw["seed"], randomize)
            ints = {"frames", "stride", "width", "height", "steps", "fps", "motion_bucket_id", "frames_per_batch"}
            settings = VideoSettings(
                **{k: (int(v) if k in ints | {"overlap", "seed"} else float(v)) for k, v in kw.items()},
                pose_source=pose_source,
            )
            settings.validate(self.max_frames, self.config.limits.max_side)
            reference = resize_and_center_crop(
                load_upload(reference_path, self.config.limits).convert("RGB"), settings.width, settings.height
            )
            progress(0, desc="Reading poses")
            poses, source_fps = self.pose_frames(video, settings, reference)
            progress(0, desc="Loading model")
            pipe = self.pipe()

            def check(_pipe, i, _t, _kwargs):
                reason = self.stop_reason(started)
                if reason:
                    raise GenerationStopped(reason, i + 1, settings.steps)
                return {}

            with self._lock:
                frames = pipe(
                    PIL.Image.fromarray(reference),
                    poses,
                    height=settings.height,
                    width=settings.width,
                    num_frames=len(poses),
                    frames_per_batch=settings.frames_per_batch,
                    overlap=min(settings.overlap, settings.frames_per_batch - 1),
                    num_inference_steps=settings.steps,
                    min_guidance_scale=settings.min_guidance,
                    max_guidance_scale=settings.max_guidance,
                    fps=settings.fps,
                    motion_bucket_id=settings.motion_bucket_id,
                    noise_aug_strength=settings.noise_aug,
                    decode_chunk_size=2,
                    controlnext_conditioning_scale=settings.control_scale,
                    generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                    output_type="np",
                    callback_on_step_end=check,
                ).frames[0]
        except GenerationStopped as err:
            raise user_error(err, "Video generation stopped") from None
        except (ValueError, FileNotFoundError) as err:
            raise user_error(err, "Cannot generate the video") from None
        folder = self.config.outputs / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"video-{time.strftime('%H%M%S')}-{settings.seed}"
        out = write_video(frames, folder / f"{stem}.mp4", fps=source_fps or settings.fps)
        write_video(poses, folder / f"{stem}-poses.mp4", fps=source_fps or settings.fps)
        meta = dict(asdict(settings), base=self.spec.base, controlnext=self.spec.controlnext, frames_out=len(frames))
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2))
        info = f"{len(frames)} frames of {settings.width}x{settings.height}; seed {settings.seed}; saved as {out.name}."
        return str(out), [str(out), str(folder / f"{stem}.json")], info, settings.seed


def build_video_tab(
    config: Any, uploads: UploadRecord | None = None, stop_reason: Callable[[float], str | None] | None = None
) -> VideoTab | None:
    """Fill the current ``gr.Tab`` with the video UI, or with a note saying what it needs; returns its state.

    ``uploads`` decides which files its events may read and ``stop_reason(started)`` when a clip must stop (the
    image tab's, so both tabs share one policy). Without the `video` extra the tab shows only the note saying how
    to install it (its form is hidden, so nothing can be uploaded; the API answers with the same note).
    """
    if not video_available():
        gr.Markdown(
            "Video generation (a reference image animated by a pose video) needs the video pipeline, which is not "
            "part of this installation.",
            elem_id="cnx-video-note",
        )
        return

    tab = VideoTab(config, uploads, stop_reason)
    spec = tab.spec
    if tab.missing:
        note = _needs_extra("**The Video tab**", tab.missing)
    else:
        note = (
            f"Animate a reference image with a pose video. Model: **{spec.label}**. The pose video holds drawn "
            "poses (white-on-black skeletons), or shows a person whose poses DWPose extracts (needs `--dwpose-dir`)."
        )
    gr.Markdown(note, elem_id="cnx-video-note")
    with gr.Row(visible=not tab.missing):
        with gr.Column():
            with gr.Row():
                reference = gr.Image(type="filepath", label="Reference image", height=220, elem_id="cnx-ref")
                video = gr.File(
                    label="Pose video", file_types=list(VIDEO_SUFFIXES), type="filepath", elem_id="cnx-pose-video"
                )
            pose_source = gr.Radio(["drawn poses", "a person (DWPose)"], value="drawn poses", label="The video shows")
            with gr.Row():
                frames = gr.Slider(1, tab.max_frames, value=min(8, tab.max_frames), step=1, label="Frames")
                stride = gr.Slider(1, 16, value=2, step=1, label="Use every n-th frame")
            with gr.Row():
                side = config.limits.max_side
                width = gr.Slider(64, max(64, side), value=spec.width, step=64, label="Width")
                height = gr.Slider(64, max(64, side), value=spec.height, step=64, label="Height")
            with gr.Row():
                steps = gr.Slider(1, 100, value=spec.steps, step=1, label="Steps")
                min_guidance = gr.Slider(0, 20, value=2.0, step=0.5, label="Min guidance")
                max_guidance = gr.Slider(0, 20, value=2.0, step=0.5, label="Max guidance")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    fps = gr.Slider(1, 30, value=7, step=1, label="fps conditioning")
                    motion = gr.Slider(1, 255, value=127, step=1, label="Motion bucket")
                    noise_aug = gr.Slider(0, 1, value=0.02, step=0.01, label="Noise augmentation")
                with gr.Row():
                    control_scale = gr.Slider(0, 5, value=1.0, step=0.05, label="Control scale")
                    frames_per_batch = gr.Slider(2, 32, value=14, step=1, label="Window length")
                    overlap = gr.Slider(0, 16, value=4, step=1, label="Window overlap")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                randomize = gr.Checkbox(value=False, label="Random seed")
            run = gr.Button("Generate video", variant="primary", elem_id="cnx-generate-video")
        with gr.Column():
            clip = gr.Video(label="Result", elem_id="cnx-video-result")
            info = gr.Markdown()
            files = gr.File(label="Download (MP4 and settings)", file_count="multiple")
    numbers = [frames, stride, width, height, steps, min_guidance, max_guidance, fps, motion, noise_aug,
               control_scale, seed, frames_per_batch, overlap]  # fmt: skip
    run.click(
        tab.generate,
        [reference, video, *numbers, randomize, pose_source],
        [clip, files, info, seed],
        concurrency_limit=1,
        concurrency_id="generate",  # shares the one-at-a-time queue with the image tab
        api_name="generate_video",
        preprocess=False,  # uploads are decoded by the tab itself (clear messages for non-images)
    )
    return tab
