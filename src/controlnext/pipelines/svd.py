"""Pose-guided Stable Video Diffusion with ControlNeXt, generating long sequences in overlapping windows.

:class:`StableVideoDiffusionControlNeXtPipeline` is the stock diffusers ``StableVideoDiffusionPipeline`` with a
``controlnext`` component and a control video (one condition frame per generated frame). Its denoising loop is the
published one for long videos:

* the sequence is split into windows of ``frames_per_batch`` frames starting every ``frames_per_batch - overlap``
  frames, the last window shifted to end at the last frame (:func:`window_starts`);
* at every step each window is denoised with its own copy of the scheduler (so a stateful scheduler's step index
  and history are per window, which is what resetting ``_step_index`` per window achieves in the release), and the
  results are averaged per frame with weights that sum to one; windows after the first leave their first frame out
  of the average (:func:`window_weights`);
* in every window the first control frame is replaced by the sequence's first control frame (the reference pose),
  so each window is anchored to the reference image;
* classifier-free guidance uses the stock min-to-max ramp over the frames of a window; modules published without
  unconditional control (``svd-v2``) get the control on the conditional half only.

Only one window's activations, control features and image latents exist at a time; the full-length tensors are the
latents (4 x H/8 x W/8 per frame) and the control frames, kept on the CPU as uint8 when they came as 8-bit images.
VAE decoding runs in chunks of ``decode_chunk_size`` frames, each moved to the CPU as soon as it is decoded, so
device memory does not grow with the length (see docs/video.md for measurements).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipelineOutput,
    _append_dims,
    _resize_with_antialiasing,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from ..conditioning import load_condition
from ..inject import attached
from .common import MAX_CONTROL_SCALE, MAX_GUIDANCE_SCALE, ControlNeXtPipelineMixin, check_number, with_controlnext

logger = logging.getLogger(__name__)

__all__ = [
    "StableVideoDiffusionControlNeXtPipeline",
    "window_starts",
    "window_weights",
]


# ---------------------------------------------------------------------- windows
def window_starts(num_frames: int, frames_per_batch: int, overlap: int) -> list[int]:
    """First frame of each denoising window (the published rule).

    Windows start every ``frames_per_batch - overlap`` frames; a window that would run past the end is shifted to
    end at the last frame. A sequence that fits one window is one window starting at 0.
    """
    if num_frames < 1 or frames_per_batch < 1:
        raise ValueError(f"num_frames and frames_per_batch must be >= 1, got {num_frames} and {frames_per_batch}.")
    if not 0 <= overlap < frames_per_batch:
        raise ValueError(f"overlap must be in [0, frames_per_batch) = [0, {frames_per_batch}), got {overlap}.")
    if num_frames <= frames_per_batch:
        return [0]
    if overlap == 0:
        raise ValueError(
            "overlap must be at least 1 when the sequence spans several windows: windows after the first leave "
            "their first frame (which is conditioned on the reference pose) to the previous window."
        )
    starts = []
    for s in range(0, num_frames - overlap, frames_per_batch - overlap):
        s = min(s, num_frames - frames_per_batch)
        if s not in starts:
            starts.append(s)
    return starts


def window_weights(num_frames: int, frames_per_batch: int, overlap: int) -> tuple[list[int], torch.Tensor]:
    """``(starts, weights)``: ``weights[w, f]`` is window ``w``'s share of frame ``f`` in the per-step average.

    Each window covers ``min(frames_per_batch, num_frames)`` frames; windows after the first do not contribute
    their first frame. Every frame's weights sum to one (float64).
    """
    starts = window_starts(num_frames, frames_per_batch, overlap)
    length = min(frames_per_batch, num_frames)
    mask = torch.zeros(len(starts), num_frames, dtype=torch.float64)
    for w, s in enumerate(starts):
        mask[w, s + (1 if s > 0 else 0) : s + length] = 1.0
    count = mask.sum(0)
    if (count == 0).any():  # cannot happen with overlap >= 1; kept as a guard for the invariant
        raise RuntimeError(f"Frames {torch.nonzero(count == 0).flatten().tolist()} are covered by no window.")
    return starts, mask / count


# ---------------------------------------------------------------------- memory measurement
def _frame_size(frame: Any) -> tuple[int, int]:
    """(height, width) of one control frame (PIL image, (H, W[, C]) array, or (C, H, W) tensor)."""
    if isinstance(frame, PIL.Image.Image):
        return frame.height, frame.width
    if isinstance(frame, torch.Tensor):
        return tuple(frame.shape[-2:])
    arr = np.asarray(frame)
    return tuple(arr.shape[:2])


def _as_frame_list(video: Any, name: str) -> Sequence:
    """Index-able frames from a list of images/arrays, an array (F, H, W, C) or a tensor (F, C, H, W) / (1, F, ...)."""
    if isinstance(video, torch.Tensor):
        if video.dim() == 5 and video.shape[0] == 1:
            video = video[0]
        if video.dim() != 4:
            raise ValueError(f"{name} as a tensor must be (F, C, H, W) in [0, 1]; got shape {tuple(video.shape)}.")
        return video
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{name} as an array must be (F, H, W, C); got shape {video.shape}.")
        return video
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{name} is empty.")
        return video
    raise TypeError(
        f"{name} must be a list of frames (PIL images or arrays), an array (F, H, W, C) or a tensor (F, C, H, W); "
        f"got {type(video).__name__}."
    )


class _ControlFrames:
    """A control video at the generation size, kept on the CPU (uint8 when the frames were 8-bit images)."""

    def __init__(self, video: Any, num_frames: int, height: int, width: int, name: str):
        frames = _as_frame_list(video, name)
        if len(frames) != num_frames:
            raise ValueError(
                f"{name} has {len(frames)} frames but {num_frames} frames are to be generated; give one control "
                f"frame per generated frame (e.g. {name}[:{num_frames}], or num_frames={len(frames)})."
            )
        sizes = {_frame_size(f) for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"All frames of {name} must have one size; found (H, W) sizes {sorted(sizes)}.")
        eight_bit = not isinstance(frames, torch.Tensor) and all(
            isinstance(f, PIL.Image.Image) and f.mode in ("RGB", "L", "RGBA", "P") or np.asarray(f).dtype == np.uint8
            for f in frames[:1]
        )
        chunks = []
        for i in range(0, num_frames, 16):  # convert in chunks: a float copy of the whole video is never held
            part = load_condition(list(frames[i : i + 16]), size=(height, width))
            chunks.append((part * 255).round().to(torch.uint8) if eight_bit else part)
        self.frames = torch.cat(chunks)

    def window(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, length, 3, H, W) in [0, 1]: frames start..start+length-1, the first replaced by frame 0."""
        index = torch.tensor([0, *range(start + 1, start + length)])
        part = self.frames.index_select(0, index).to(device)
        part = part.float() / 255.0 if part.dtype == torch.uint8 else part
        return part.to(dtype)[None]


# ---------------------------------------------------------------------- pipeline
@with_controlnext(StableVideoDiffusionPipeline)
class StableVideoDiffusionControlNeXtPipeline(ControlNeXtPipelineMixin, StableVideoDiffusionPipeline):
    r"""Stable Video Diffusion (image to video) with ControlNeXt control, e.g. a pose sequence to follow.

    Components: those of ``StableVideoDiffusionPipeline`` (``vae``, ``image_encoder``, ``unet``, ``scheduler``,
    ``feature_extractor``) plus ``controlnext`` (a :class:`~controlnext.ControlNeXtModel` of variant ``svd-v2`` or
    ``svd``, a list of them, or None for plain windowed SVD). Published checkpoints: see
    :meth:`from_published`.
    """

    @classmethod
    def from_published(
        cls,
        base: str,
        controlnext: str | None,
        unet_weights: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> StableVideoDiffusionControlNeXtPipeline:
        """Load a base SVD pipeline (folder or hub id), a control module file and, optionally, the released UNet.

        ``controlnext``: the released ``controlnet.bin`` (read tensors-only) or any file/folder
        :func:`controlnext.loading.load_controlnext` accepts; ``unet_weights``: the released full ``unet.bin``
        (or a subset/delta file), loaded into the base UNet with strict key and shape checks. ``.bin`` files are
        read tensors-only unless ``allow_pickle`` (trusted files only).
        """
        from ..loading import load_controlnext, load_unet_weights

        pipe = cls.from_pretrained(base, torch_dtype=torch_dtype, **kwargs)
        if unet_weights is not None:
            load_unet_weights(pipe.unet, unet_weights, allow_pickle=allow_pickle)
        if controlnext is not None:
            cast = torch_dtype if torch_dtype not in (None, torch.float32) else None  # modules load as float32
            module = load_controlnext(
                controlnext, variant=variant, family="svd", allow_pickle=allow_pickle, torch_dtype=cast
            )
            pipe.set_controlnext(module.to(pipe.unet.device))
        return pipe

    # ------------------------------------------------------------------ helpers
    def _encode_image(self, image, device, num_videos_per_prompt, do_classifier_free_guidance) -> torch.Tensor:
        """CLIP image embeddings; like the stock method, but tensors in [0, 1] are resized for CLIP too."""
        if isinstance(image, torch.Tensor):
            size = int(getattr(self.image_encoder.config, "image_size", 224))
            image = image if image.dim() == 4 else image[None]
            image = (_resize_with_antialiasing(image.float() * 2.0 - 1.0, (size, size)) + 1.0) / 2.0
        return super()._encode_image(image, device, num_videos_per_prompt, do_classifier_free_guidance)

    def decode_latents(self, latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14) -> torch.Tensor:
        """Decode ``decode_chunk_size`` frames at a time; each chunk goes to the CPU (float32) right away."""
        batch = latents.shape[0]
        flat = latents.flatten(0, 1) / self.vae.config.scaling_factor
        frames = []
        for i in range(0, flat.shape[0], decode_chunk_size):
            chunk = flat[i : i + decode_chunk_size]
            frames.append(self.vae.decode(chunk, num_frames=chunk.shape[0]).sample.float().cpu())
        video = torch.cat(frames).reshape(batch, num_frames, *frames[0].shape[1:])
        return video.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W), what the stock post-processing expects

    def _check_size(self, height: int, width: int) -> None:
        factor = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {factor} for this model (VAE factor "
                f"{self.vae_scale_factor} x UNet down-sampling); got {width}x{height} (WxH). The published models "
                "use 576x1024."
            )

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor,
        control_video: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        frames_per_batch: int = 14,
        overlap: int = 4,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        controlnext_conditioning_scale: float | Sequence[float] = 1.0,
        control_level: float | None = None,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
    ) -> StableVideoDiffusionPipelineOutput | Any:
        r"""Generate a video from ``image`` that follows ``control_video``.

        Args:
            image: the reference image (PIL, list of PIL for a batch, or tensor (B, 3, H, W) in [0, 1]).
            control_video: one control frame per generated frame (a list of PIL images/arrays, an array
                (F, H, W, C) or a tensor (F, C, H, W) in [0, 1]); with several modules, a list with one video per
                module. For pose control its first frame should be the reference image's own pose.
            height, width: output size (default: the control frames' size); multiples of 64 for SVD.
            num_frames: frames to generate (default: the control video's length; must equal it).
            frames_per_batch, overlap: window length and overlap of the windowed denoising (published: 14 and 4).
            num_inference_steps, sigmas: denoising schedule (stock meaning).
            min_guidance_scale, max_guidance_scale: the guidance ramp over the frames of a window (the published
                video models use 2-3 for both).
            fps, motion_bucket_id, noise_aug_strength: SVD micro-conditioning (stock defaults 7, 127, 0.02).
            decode_chunk_size: frames per VAE decode call (default: all of a window).
            controlnext_conditioning_scale: multiplies the control (per module); 0 disables it.
            control_level: overrides the module's control level (0.2 for ``svd-v2``; the authors use 1.0 for dense
                controls such as depth).
            control_guidance_start, control_guidance_end: fraction of the schedule with control.
            output_type: "pil", "np", "pt" or "latent".

        Returns:
            ``StableVideoDiffusionPipelineOutput`` with ``frames`` (per video: a list of PIL images, or arrays).
        """
        modules = self.controlnext_modules
        if modules and control_video is None:
            raise ValueError("control_video is required: the pipeline has a ControlNeXt module (one frame per frame).")
        if control_video is not None and not modules:
            raise ValueError("control_video was given but the pipeline has no ControlNeXt module (see from_published).")
        videos = [control_video] if len(modules) <= 1 else list(control_video)
        if len(videos) != max(len(modules), 1):
            raise ValueError(f"Give one control video per module: {len(modules)} modules, {len(videos)} videos.")
        if control_video is not None and num_frames is None:
            num_frames = len(_as_frame_list(videos[0], "control_video"))
        num_frames = num_frames if num_frames is not None else self.unet.config.num_frames
        if (height is None or width is None) and control_video is not None:
            h0, w0 = _frame_size(_as_frame_list(videos[0], "control_video")[0])
            height, width = height or h0, width or w0
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(image, height, width)
        self._check_size(height, width)
        starts, weights = window_weights(num_frames, frames_per_batch, overlap)
        length = min(frames_per_batch, num_frames)
        decode_chunk_size = decode_chunk_size or length
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ValueError(
                "Need 0 <= control_guidance_start < control_guidance_end <= 1; got "
                f"{control_guidance_start} and {control_guidance_end}."
            )
        scales = list(controlnext_conditioning_scale) if isinstance(controlnext_conditioning_scale, Sequence) else [
            controlnext_conditioning_scale
        ] * len(modules)  # fmt: skip
        if len(scales) != len(modules):
            raise ValueError(f"Got {len(scales)} conditioning scales for {len(modules)} modules.")
        scales = [check_number("controlnext_conditioning_scale", s, 0.0, MAX_CONTROL_SCALE) for s in scales]
        if control_level is not None:
            check_number("control_level", control_level, 0.0, MAX_CONTROL_SCALE)
        check_number("min_guidance_scale", min_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
        check_number("max_guidance_scale", max_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
        controls = [
            _ControlFrames(v, num_frames, height, width, "control_video" if len(videos) == 1 else f"control_video[{i}]")
            for i, v in enumerate(videos)
            if modules
        ]

        batch_size = 1 if isinstance(image, PIL.Image.Image) else len(image)
        device = self._execution_device
        self._guidance_scale = max_guidance_scale
        do_cfg = self.do_classifier_free_guidance

        # Conditioning on the reference image (as the stock pipeline, in the same order of random draws).
        image_embeddings = self._encode_image(image, device, num_videos_per_prompt, do_cfg)
        fps = fps - 1  # SVD was micro-conditioned on fps - 1
        ref = self.video_processor.preprocess(image, height=height, width=width).to(device)
        ref = ref + noise_aug_strength * randn_tensor(ref.shape, generator=generator, device=device, dtype=ref.dtype)
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        image_latents = self._encode_vae_image(ref, device, num_videos_per_prompt, do_cfg)
        image_latents = image_latents.to(image_embeddings.dtype)
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        window_image_latents = image_latents[:, None].expand(-1, length, -1, -1, -1)
        added_time_ids = self._get_add_time_ids(
            fps, motion_bucket_id, noise_aug_strength, image_embeddings.dtype, batch_size, num_videos_per_prompt, do_cfg
        ).to(device)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, None, sigmas)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            num_frames,
            self.unet.config.in_channels,
            height,
            width,
            image_embeddings.dtype,
            device,
            generator,
            latents,
        )
        guidance = torch.linspace(min_guidance_scale, max_guidance_scale, length, device=device, dtype=latents.dtype)
        guidance = _append_dims(guidance[None].repeat(latents.shape[0], 1), latents.ndim)
        self._guidance_scale = guidance
        weights = weights.to(device=device, dtype=torch.float32)
        # One scheduler per window: each keeps its own step index (and history, for multistep schedulers).
        schedulers = [copy.deepcopy(self.scheduler) for _ in starts]
        self._num_timesteps = len(timesteps)

        levels = []
        for module in modules:
            if control_level is not None and module.config.control_level == 0:
                raise ValueError("This module's control level is 0, so it cannot be rescaled.")
            levels.append(1.0 if control_level is None else control_level / module.config.control_level)
        with attached(
            self.unet, modules, None, [float(s) * lv for s, lv in zip(scales, levels)],
            starts=control_guidance_start, ends=control_guidance_end, guidance=do_cfg, num_steps=num_inference_steps,
        ) as adapter:  # conditions are set per window in _denoise
            latents = self._denoise(
                latents, timesteps, schedulers, starts, weights, length, controls, adapter,
                image_embeddings, window_image_latents, added_time_ids, do_cfg,
                callback_on_step_end, callback_on_step_end_tensor_inputs or ["latents"],
            )  # fmt: skip

        if output_type == "latent":
            frames = latents
        else:
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
            video = self.decode_latents(latents, num_frames, decode_chunk_size)
            frames = self.video_processor.postprocess_video(video=video, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableVideoDiffusionPipelineOutput(frames=frames) if return_dict else frames

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        schedulers: list,
        starts: list[int],
        weights: torch.Tensor,
        length: int,
        controls: list[_ControlFrames],
        adapter,
        image_embeddings: torch.Tensor,
        image_latents: torch.Tensor,
        added_time_ids: torch.Tensor,
        do_cfg: bool,
        callback_on_step_end,
        callback_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """The windowed denoising loop; returns the final latents (B, F, C, h, w)."""
        current = [None] * len(controls)  # window start each slot's condition was last set for
        n_steps, n_windows = len(timesteps), len(starts)
        with self.progress_bar(total=n_steps * n_windows) as bar:
            for i, t in enumerate(timesteps):
                adapter.set_step(i)
                blended = torch.zeros_like(latents)
                for w, (start, scheduler) in enumerate(zip(starts, schedulers)):
                    for k, (slot, control) in enumerate(zip(adapter.slots, controls)):
                        if current[k] != start:  # one window: set once, so the static features stay cached
                            slot.set_condition(control.window(start, length, latents.device, slot.module.dtype))
                            current[k] = start
                    window = latents[:, start : start + length]
                    model_input = torch.cat([window] * 2) if do_cfg else window
                    model_input = scheduler.scale_model_input(model_input, t)
                    model_input = torch.cat([model_input, image_latents], dim=2)
                    noise_pred = self.unet(
                        model_input,
                        t,
                        encoder_hidden_states=image_embeddings,
                        added_time_ids=added_time_ids,
                        return_dict=False,
                    )[0]
                    if do_cfg:
                        uncond, cond = noise_pred.chunk(2)
                        noise_pred = uncond + self._guidance_scale * (cond - uncond)
                    out = scheduler.step(noise_pred, t, window).prev_sample
                    share = weights[w, start : start + length].to(out.dtype)
                    blended[:, start : start + length] += out * share[None, :, None, None, None]
                    bar.update()
                    bar.set_postfix_str(f"step {i + 1}/{n_steps} window {w + 1}/{n_windows}", refresh=False)
                latents = blended
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_tensor_inputs})
                    latents = outputs.pop("latents", latents)
        return latents
