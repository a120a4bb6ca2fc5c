"""Part 2: SVD-v2 peak memory at 576x1024 for one denoising step of a 14- and a 24-frame window, with and without
model CPU offload, and the largest window that fits a 24 GiB GPU.

Each measurement is one call of :class:`controlnext.pipelines.svd.StableVideoDiffusionControlNeXtPipeline` (the
project's windowed loop) with the real SVD (img2vid-xt) UNet, temporal VAE and CLIP ViT-H image encoder and the
``svd-v2`` control module, all with random weights in float16: one denoising step with guidance over one window of
F frames (``frames_per_batch = num_frames = F``), then the VAE decode in chunks of 2 frames (the default of
``controlnext video --decode-chunk-size``). Two peaks are read: up to the end of the denoising step (image encoding,
VAE encoding and the step; read in ``callback_on_step_end``) and during the decode. On CUDA they are
``max_memory_allocated`` and ``max_memory_reserved`` (weights on the GPU included); the memory a GPU must have is
taken as the reserved peak plus what the process holds outside the allocator (CUDA context, measured with
``mem_get_info``).

Largest window in 24 GiB: the need grows linearly with the window length (each frame adds the same activations to
the UNet's spatial layers and to the temporal attention's sequence; memory-efficient attention keeps attention
memory linear), so need(F) = a + b F is fitted through the 14- and 24-frame measurements and solved for 24 GiB. On
CUDA the predicted window is then run once under ``torch.cuda.set_per_process_memory_fraction`` capped at 24 GiB
minus the context, which verifies (or refutes) the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from common import OK, OOM, SKIPPED, Item, MeasurementError, fmt_gib, fmt_s, is_oom, markdown_table, status_cell

GIB = 2**30
GPU_BUDGET = 24 * GIB  # a "24 GB" card (RTX 3090/4090, A5000): 24 GiB of device memory
DECODE_CHUNK = 2  # `controlnext video --decode-chunk-size` default
MAX_VERIFIED = 64  # longest window run under the cap (a longer prediction is verified up to this length)

# The published SVD img2vid-xt configs (model_index of stabilityai/stable-video-diffusion-img2vid-xt), minus weights.
SVD_UNET: dict[str, Any] = dict(sample_size=96, num_frames=25)  # the other defaults of the class are SVD's
SVD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
    scaling_factor=0.18215,
    force_upcast=True,
)
SVD_IMAGE_ENCODER: dict[str, Any] = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)


def _settings(smoke: bool) -> dict[str, Any]:
    if smoke:  # tiny random SVD models (controlnext.testing.tiny_svd_components), 64x128 px, 4 and 6 frames
        return dict(device="cpu", dtype="float32", height=64, width=128, windows=(4, 6), budget=64 * 2**20)
    return dict(device="cuda", dtype="float16", height=576, width=1024, windows=(14, 24), budget=GPU_BUDGET)


def _pipeline(smoke: bool, device: str, dtype_name: str, offload: bool):
    import torch

    from controlnext.bench import build_random
    from controlnext.models.controlnext import ControlNeXtModel
    from controlnext.pipelines.svd import StableVideoDiffusionControlNeXtPipeline
    from controlnext.testing import tiny_controlnext, tiny_svd_components

    dtype = getattr(torch, dtype_name)
    comps = tiny_svd_components()  # the release's scheduler and feature extractor settings
    if smoke:
        comps["controlnext"] = tiny_controlnext("svd-v2")
        for name in ("vae", "image_encoder", "unet", "controlnext"):
            comps[name] = comps[name].to(device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        dev = torch.device(device)
        comps["unet"] = build_random(lambda: UNetSpatioTemporalConditionModel(**SVD_UNET), dev, dtype)
        comps["vae"] = build_random(lambda: AutoencoderKLTemporalDecoder(**SVD_VAE), dev, dtype)
        comps["image_encoder"] = build_random(
            lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER)), dev, dtype
        )
        comps["controlnext"] = build_random(lambda: ControlNeXtModel.from_variant("svd-v2"), dev, dtype)
    pipe = StableVideoDiffusionControlNeXtPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    return pipe


_PIPELINE: dict[str, Any] = {}  # the one pipeline alive (per offload setting), reused by that setting's runs


def _cached_pipeline(smoke: bool, device: str, dtype_name: str, offload: bool):
    """The pipeline for ``offload``: built once, the other setting's freed first (one set of weights at a time)."""
    if _PIPELINE.get("offload") is not offload:
        import gc

        import torch

        _PIPELINE.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _PIPELINE.update(offload=offload, pipe=_pipeline(smoke, device, dtype_name, offload))
    return _PIPELINE["pipe"]


class _Meter:
    """Peak memory in phases. CUDA: the allocator's peaks (absolute). CPU: weights plus the live tensors created
    during the call (``TensorMemoryTracker``), the CPU analogue."""

    def __init__(self, device: str, weights: int):
        import torch

        self.cuda = device.startswith("cuda")
        self.weights = weights
        self.torch = torch
        self.tracker = None

    def __enter__(self) -> _Meter:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            from controlnext.bench import TensorMemoryTracker

            self.tracker = TensorMemoryTracker().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(*exc)

    def read_and_reset(self) -> tuple[int, int | None]:
        """(allocated peak, reserved peak or None) since the last reset."""
        if self.cuda:
            cuda = self.torch.cuda
            cuda.synchronize()
            peaks = cuda.max_memory_allocated(), cuda.max_memory_reserved()
            cuda.reset_peak_memory_stats()
            return peaks
        peak = self.weights + self.tracker.peak_bytes
        self.tracker.peak_bytes = self.tracker.current_bytes
        return peak, None


def _context_bytes(cuda: bool) -> int | None:
    """Device memory this process holds outside torch's allocator (CUDA context, libraries), on a dedicated GPU."""
    if not cuda:
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return max(total - free - torch.cuda.memory_reserved(), 0)


def measure_window(smoke: bool, frames: int, offload: bool, cap_bytes: int | None = None) -> dict[str, Any]:
    """Peak memory of one denoising step over one window of ``frames`` frames, and of its chunked decode."""
    import numpy as np
    import PIL.Image
    import torch

    from controlnext.bench import StepClock

    s = _settings(smoke)
    cuda = s["device"].startswith("cuda")
    pipe = _cached_pipeline(smoke, s["device"], s["dtype"], offload)
    h, w = s["height"], s["width"]
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    poses = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    weights = sum(
        t.numel() * t.element_size()
        for m in (pipe.unet, pipe.vae, pipe.image_encoder, pipe.controlnext)
        for t in [*m.parameters(), *m.buffers()]
    )
    if cap_bytes is not None:  # the cap leaves room for what the process holds outside the allocator
        context = _context_bytes(cuda)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes - context) / total))
    step_peak: list[tuple[int, int | None]] = []
    clock = StepClock(s["device"])
    try:
        with _Meter(s["device"], weights) as meter:

            def after_step(_pipe, i, t, tensors):
                step_peak.append(meter.read_and_reset())
                return {}

            clock.start()
            out = pipe(
                image=image,
                control_video=poses,
                height=h,
                width=w,
                num_frames=frames,
                frames_per_batch=frames,
                overlap=min(4, frames - 1),
                num_inference_steps=1,
                decode_chunk_size=DECODE_CHUNK,
                output_type="np",
                callback_on_step_end=after_step,
                generator=torch.Generator().manual_seed(0),
            )
            call_s = clock.stop()
            decode_peak = meter.read_and_reset()
    finally:
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    context = _context_bytes(cuda)  # after the call: the libraries' handles exist by now
    if np.asarray(out.frames[0]).shape[0] != frames:
        raise MeasurementError(f"the pipeline returned {np.asarray(out.frames[0]).shape[0]} frames, not {frames}")
    if len(step_peak) != 1:
        raise MeasurementError(f"expected one denoising step, the callback ran {len(step_peak)} times")
    rec: dict[str, Any] = dict(
        frames=frames,
        size=f"{h}x{w}",
        dtype=s["dtype"],
        offload=offload,
        decode_chunk=DECODE_CHUNK,
        call_s=call_s,
        step_peak_bytes=step_peak[0][0],
        decode_peak_bytes=decode_peak[0],
        peak_bytes=max(step_peak[0][0], decode_peak[0]),
    )
    if cuda:
        rec["step_reserved_bytes"] = step_peak[0][1]
        rec["decode_reserved_bytes"] = decode_peak[1]
        rec["context_bytes"] = context
        rec["need_bytes"] = max(step_peak[0][1], decode_peak[1]) + context
    else:
        rec["need_bytes"] = rec["peak_bytes"]
    rec["fits_budget"] = rec["need_bytes"] <= s["budget"]
    return rec


def fit_window(records: list[dict[str, Any]], offload: bool, smoke: bool) -> dict[str, Any]:
    """need(F) = a + b F through the two measured windows; the largest F whose need fits the budget."""
    s = _settings(smoke)
    f1, f2 = s["windows"]
    by_frames = {
        r["frames"]: r for r in records if r.get("status") == OK and r.get("offload") == offload and "need_bytes" in r
    }
    if f1 not in by_frames or f2 not in by_frames:
        raise MeasurementError(f"needs the {f1}- and {f2}-frame measurements (offload={offload}), one is missing")
    n1, n2 = by_frames[f1]["need_bytes"], by_frames[f2]["need_bytes"]
    slope = (n2 - n1) / (f2 - f1)
    if slope <= 0:
        raise MeasurementError(
            f"memory did not grow with the window ({n1} bytes at {f1} frames, {n2} at {f2}): cannot extrapolate"
        )
    intercept = n1 - slope * f1
    largest = math.floor((s["budget"] - intercept) / slope)
    return dict(
        offload=offload,
        per_frame_bytes=int(slope),
        fixed_bytes=int(intercept),
        budget_bytes=s["budget"],
        largest_window=largest,
    )


def items(smoke: bool) -> list[Item]:
    """Per offload setting: the two windows, the fit, and the capped run of the predicted largest window."""
    s = _settings(smoke)
    out: list[Item] = []
    done: list[dict[str, Any]] = []

    for offload in (False, True):
        tag = " offload" if offload else ""
        fits: dict[str, Any] = {}

        def window(frames: int, o: bool = offload) -> list[dict[str, Any]]:
            rec = measure_window(smoke, frames, o)
            done.append({**rec, "status": OK})
            return [rec]

        def fit(o: bool = offload, fits: dict = fits) -> list[dict[str, Any]]:
            fits.update(fit_window(done, o, smoke))
            return [dict(fits)]

        def verify(o: bool = offload, fits: dict = fits) -> list[dict[str, Any]]:
            if smoke:
                return [
                    dict(offload=o, status=SKIPPED, error="the capped run needs CUDA (set_per_process_memory_fraction)")
                ]
            if not fits:
                raise MeasurementError("no fitted window to verify")
            frames = min(fits["largest_window"], MAX_VERIFIED)
            if frames < 2:
                return [
                    dict(offload=o, status=SKIPPED, error=f"no window of 2 or more frames fits ({frames} predicted)")
                ]
            try:
                rec = measure_window(smoke, frames, o, cap_bytes=s["budget"])
            except Exception as err:
                if not is_oom(err):
                    raise
                error = f"the predicted {frames}-frame window did not fit under the cap: {err}"[:500]
                return [dict(offload=o, frames=frames, status=OOM, error=error)]
            rec["verified_in_budget"] = True
            return [rec]

        for frames in s["windows"]:
            out.append(
                Item(f"window {frames} frames{tag}", lambda f=frames, w=window: w(f), like=out[0].name if out else None)
            )
        out.append(Item(f"largest window{tag}", fit))
        out.append(Item(f"verify largest window{tag}", verify, like=out[1].name))
    return out


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("measurement", lambda r: r["item"]),
    ("offload", lambda r: "yes" if r.get("offload") else "no"),
    ("frames", lambda r: str(r.get("frames", r.get("largest_window", "-")))),
    (
        "step peak (alloc / reserved)",
        lambda r: (
            f"{fmt_gib(r.get('step_peak_bytes'))} / {fmt_gib(r.get('step_reserved_bytes'))}"
            if "step_peak_bytes" in r
            else "-"
        ),
    ),
    (
        "decode peak (alloc / reserved)",
        lambda r: (
            f"{fmt_gib(r.get('decode_peak_bytes'))} / {fmt_gib(r.get('decode_reserved_bytes'))}"
            if "decode_peak_bytes" in r
            else "-"
        ),
    ),
    ("GPU memory needed", lambda r: fmt_gib(r.get("need_bytes"))),
    ("fits budget", lambda r: ("yes" if r["fits_budget"] else "no") if "fits_budget" in r else "-"),
    (
        "fit: fixed + per frame",
        lambda r: (
            f"{fmt_gib(r['fixed_bytes'])} + {fmt_gib(r['per_frame_bytes'])}/frame" if "per_frame_bytes" in r else "-"
        ),
    ),
    ("call", lambda r: fmt_s(r.get("call_s"))),
    ("status", status_cell),
]


def table(records: list[dict[str, Any]]) -> str:
    return markdown_table([h for h, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in records])


def goals(records: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    s = _settings(smoke)
    f = s["windows"][1]
    out = []
    for offload in (False, True):
        goal = f"SVD-v2 {f}-frame window at {s['height']}x{s['width']} fits {fmt_gib(s['budget'])}" + (
            " (model CPU offload)" if offload else ""
        )
        rec = next(
            (
                r
                for r in records
                if r.get("frames") == f
                and r.get("offload") == offload
                and "fits_budget" in r
                and r["item"].startswith("window")
            ),
            None,
        )
        if rec is None or rec.get("status") != OK:
            out.append(dict(goal=goal, measured="not measured", status="not measured"))
            continue
        largest = next(
            (r for r in records if r.get("offload") == offload and "largest_window" in r and r.get("status") == OK),
            None,
        )
        measured = f"needs {fmt_gib(rec['need_bytes'])}" + (
            f"; largest window {largest['largest_window']} frames" if largest else ""
        )
        out.append(dict(goal=goal, measured=measured, status="met" if rec["fits_budget"] else "not met"))
    return out
