"""The tiny SVD ControlNeXt pipeline: end to end, windowing, memory, offload, loading and input errors."""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from controlnext import attach
from controlnext.bench import TensorMemoryTracker
from controlnext.conditioning import load_condition
from controlnext.loading import save_controlnext_file
from controlnext.pipelines.svd import (
    StableVideoDiffusionControlNeXtPipeline,
    window_starts,
    window_weights,
)
from controlnext.testing import tiny_controlnext, tiny_svd_components
from controlnext.video_io import read_video

STOCK_PARTS = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a single intra-op thread is faster and keeps timings stable on shared CI machines.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int, size=(64, 64)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pipe():
    p = StableVideoDiffusionControlNeXtPipeline(**tiny_svd_components(), controlnext=tiny_controlnext("svd-v2"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ref():
    return _images(1, 0)[0]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- windows
def test_window_starts_follow_the_published_rule():
    assert window_starts(10, 14, 4) == [0]  # fits one window
    assert window_starts(14, 14, 4) == [0]
    assert window_starts(20, 14, 4) == [0, 6]  # the second window is shifted to end at frame 19
    assert window_starts(24, 14, 4) == [0, 10]
    assert window_starts(25, 14, 4) == [0, 10, 11]
    assert window_starts(50, 24, 6) == [0, 18, 26]  # the release script's 24/6 setting
    assert window_starts(7, 3, 1) == [0, 2, 4]
    with pytest.raises(ValueError, match="overlap must be in"):
        window_starts(20, 4, 4)
    with pytest.raises(ValueError, match="at least 1"):
        window_starts(20, 4, 0)


@pytest.mark.parametrize("frames,length,overlap", [(6, 8, 2), (20, 14, 4), (25, 14, 4), (33, 6, 1), (40, 24, 6)])
def test_blend_weights_sum_to_one(frames, length, overlap):
    starts, w = window_weights(frames, length, overlap)
    assert w.shape == (len(starts), frames)
    torch.testing.assert_close(w.sum(0), torch.ones(frames, dtype=torch.float64), rtol=0, atol=1e-12)
    length = min(length, frames)
    for i, s in enumerate(starts):
        outside = torch.ones(frames, dtype=torch.bool)
        outside[s : s + length] = False
        assert (w[i, outside] == 0).all()  # a window only covers its own frames
        if s > 0:
            assert w[i, s] == 0  # ...and windows after the first leave their first frame out
        assert (w[i, s + 1 : s + length] > 0).all()


# ---------------------------------------------------------------------- end to end
def test_tiny_pipeline_writes_an_mp4_with_the_asked_number_of_frames(pipe, ref, tmp_path):
    from controlnext.video_io import write_video

    poses = _images(7, 1)
    out = pipe(ref, poses, num_inference_steps=2, frames_per_batch=4, overlap=2, decode_chunk_size=3, generator=_gen())
    frames = out.frames[0]
    assert len(frames) == 7 and frames[0].size == (64, 64)
    clip = read_video(write_video(frames, tmp_path / "out.mp4", fps=7))
    assert len(clip) == 7 and clip.size == (64, 64) and clip.fps == pytest.approx(7)
    assert len(read_video(write_video(frames, tmp_path / "out.gif", fps=7))) == 7


def _stock_with_control(pipe, ref, poses, steps, **kw):
    """An independent reference: the stock diffusers SVD pipeline with the module attached by hand."""
    stock = StableVideoDiffusionPipeline(**{k: getattr(pipe, k) for k in STOCK_PARTS})
    stock.set_progress_bar_config(disable=True)
    adapter = attach(stock.unet, pipe.controlnext, guidance=True)
    adapter.slots[0].set_condition(load_condition(poses)[None])
    try:
        return stock(ref, height=64, width=64, num_frames=len(poses), num_inference_steps=steps, **kw).frames
    finally:
        adapter.detach()


def test_a_sequence_that_fits_one_window_matches_the_stock_pipeline(pipe, ref):
    poses = _images(5, 2)
    kw = dict(generator=_gen(3), output_type="np", min_guidance_scale=1.5, max_guidance_scale=2.5)
    expected = _stock_with_control(pipe, ref, poses, 3, decode_chunk_size=5, **kw)
    for frames_per_batch in (5, 14):  # exactly one window, and a window longer than the sequence
        kw["generator"] = _gen(3)
        got = pipe(ref, poses, num_inference_steps=3, frames_per_batch=frames_per_batch, overlap=4, **kw).frames
        np.testing.assert_allclose(got, expected, atol=2e-6)


def _release_style_windows(pipe, ref, poses, steps, length, overlap, seed, guidance=(1.5, 2.5)):
    """The release's loop, written independently: one scheduler whose step index is reset for every window,
    sums and counts for the blend, the first control frame swapped into every window."""
    stock = StableVideoDiffusionPipeline(**{k: getattr(pipe, k) for k in STOCK_PARTS})
    sched = copy.deepcopy(pipe.scheduler)
    n = len(poses)
    gen = _gen(seed)
    emb = stock._encode_image(ref, "cpu", 1, True)
    img = stock.video_processor.preprocess(ref, height=64, width=64)
    img = img + 0.02 * torch.randn(img.shape, generator=gen)
    img_lat = stock._encode_vae_image(img, "cpu", 1, True)
    ids = stock._get_add_time_ids(6, 127, 0.02, emb.dtype, 1, 1, True)
    sched.set_timesteps(steps)
    latents = torch.randn((1, n, 4, 8, 8), generator=gen) * sched.init_noise_sigma
    cond_all = load_condition(poses)
    gscale = torch.linspace(*guidance, length)[None, :, None, None, None]
    adapter = attach(stock.unet, pipe.controlnext, guidance=True)
    try:
        for t in sched.timesteps:
            total, count = torch.zeros_like(latents), torch.zeros(1, n, 1, 1, 1)
            for s in range(0, n - overlap, length - overlap):
                s = min(s, n - length)
                sched._step_index = None
                cond = cond_all[s : s + length].clone()
                cond[0] = cond_all[0]
                adapter.slots[0].set_condition(cond[None])
                x = sched.scale_model_input(torch.cat([latents[:, s : s + length]] * 2), t)
                x = torch.cat([x, img_lat[:, None].repeat(1, length, 1, 1, 1)], dim=2)
                pred = stock.unet(x, t, encoder_hidden_states=emb, added_time_ids=ids, return_dict=False)[0]
                u, c = pred.chunk(2)
                out = sched.step(u + gscale * (c - u), t, latents[:, s : s + length]).prev_sample
                skip = 1 if s > 0 else 0
                total[:, s + skip : s + length] += out[:, skip:]
                count[:, s + skip : s + length] += 1
            latents = total / count
    finally:
        adapter.detach()
    return latents


def test_windowed_denoising_matches_the_release_loop(pipe, ref):
    poses = _images(9, 4)
    expected = _release_style_windows(pipe, ref, poses, steps=2, length=4, overlap=2, seed=5)
    got = pipe(
        ref,
        poses,
        num_inference_steps=2,
        frames_per_batch=4,
        overlap=2,
        min_guidance_scale=1.5,
        max_guidance_scale=2.5,
        generator=_gen(5),
        output_type="latent",
    ).frames
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_control_reaches_only_the_conditional_half_for_svd_v2(pipe, ref):
    seen = []
    hook = pipe.unet.down_blocks[1].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].clone()), with_kwargs=True
    )
    try:
        poses = _images(4, 6)
        for scale in (1.0, 0.0):
            pipe(
                ref,
                poses,
                num_inference_steps=1,
                controlnext_conditioning_scale=scale,
                generator=_gen(),
                output_type="latent",
            )
    finally:
        hook.remove()
    with_control, without = seen
    half = with_control.shape[0] // 2  # (2 x frames) rows: unconditional frames first
    torch.testing.assert_close(with_control[:half], without[:half], rtol=0, atol=0)
    assert (with_control[half:] - without[half:]).abs().max() > 1e-3


def test_scale_zero_equals_no_module_and_control_level_rescales(pipe, ref):
    poses = _images(4, 7)
    kw = dict(num_inference_steps=2, output_type="latent")
    off = pipe(ref, poses, controlnext_conditioning_scale=0.0, generator=_gen(), **kw).frames
    bare = StableVideoDiffusionControlNeXtPipeline(**{k: getattr(pipe, k) for k in STOCK_PARTS})
    bare.set_progress_bar_config(disable=True)
    plain = bare(ref, num_frames=4, height=64, width=64, generator=_gen(), **kw).frames
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    level = pipe(ref, poses, control_level=0.4, generator=_gen(), **kw).frames  # svd-v2's level is 0.2
    double = pipe(ref, poses, controlnext_conditioning_scale=2.0, generator=_gen(), **kw).frames
    torch.testing.assert_close(level, double, rtol=0, atol=0)
    assert (level - off).abs().max() > 1e-4


def test_memory_of_the_windowed_path_stays_flat_as_length_grows(pipe, ref):
    """Peak live tensor bytes while denoising (the tracker sees every tensor an operator creates, on any device)."""
    peaks = {}
    for frames in (8, 32):
        poses = _images(frames, 8)
        for length in (4, frames):
            with TensorMemoryTracker() as mem:
                pipe(ref, poses, num_inference_steps=1, frames_per_batch=length, overlap=1, output_type="latent")
            peaks[frames, length] = mem.peak_bytes
    windowed_growth = peaks[32, 4] - peaks[8, 4]
    full_growth = peaks[32, 32] - peaks[8, 8]
    # Only per-frame state held for the whole sequence grows with the length (latents, image latents, control
    # frames: 15-30 kB per frame here, depending on which transient sets the peak) ...
    assert windowed_growth < 24 * 40_000, peaks
    assert peaks[32, 4] < 1.3 * peaks[8, 4], peaks
    # ... while one window over everything grows with the UNet's activations (the measure is sensitive to it).
    assert full_growth > 10 * windowed_growth, peaks


def test_model_cpu_offload_gives_the_same_frames(ref):
    p = StableVideoDiffusionControlNeXtPipeline(**tiny_svd_components(), controlnext=tiny_controlnext("svd-v2"))
    p.set_progress_bar_config(disable=True)
    poses = _images(5, 9)
    kw = dict(num_inference_steps=2, frames_per_batch=3, overlap=1, output_type="np")
    expected = p(ref, poses, generator=_gen(), **kw).frames
    p.enable_model_cpu_offload(device="cpu")
    assert hasattr(p.unet, "_hf_hook") and not hasattr(p.controlnext, "_hf_hook")  # the small module stays put
    np.testing.assert_array_equal(p(ref, poses, generator=_gen(), **kw).frames, expected)


def test_published_files_load(tmp_path, ref):
    """A base SVD folder + control module file + a full-UNet .bin (tensors only), as the release ships them."""
    base = StableVideoDiffusionPipeline(**tiny_svd_components())
    base.save_pretrained(tmp_path / "base")
    module = tiny_controlnext("svd-v2", seed=3)
    save_controlnext_file(module, tmp_path / "controlnext.safetensors")
    unet_state = {k: v + 0.01 for k, v in base.unet.state_dict().items()}
    torch.save(unet_state, tmp_path / "unet.bin")
    p = StableVideoDiffusionControlNeXtPipeline.from_published(
        str(tmp_path / "base"), str(tmp_path / "controlnext.safetensors"), unet_weights=str(tmp_path / "unet.bin")
    )
    for k, v in p.unet.state_dict().items():
        torch.testing.assert_close(v, unet_state[k])
    for k, v in p.controlnext.state_dict().items():
        torch.testing.assert_close(v, module.state_dict()[k])
    assert p.controlnext.config.variant == "svd-v2"
    p.set_progress_bar_config(disable=True)
    assert len(p(ref, _images(3, 1), num_inference_steps=1, output_type="np").frames[0]) == 3


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(pipe, ref):
    poses = _images(6, 10)
    run = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="control_video has 6 frames but 5 frames are to be generated"):
        pipe(ref, poses, num_frames=5, **run)
    with pytest.raises(ValueError, match="has 6 frames but 8"):
        pipe(ref, poses, num_frames=8, **run)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(ref, poses, height=72, width=64, **run)
    with pytest.raises(ValueError, match="one size"):
        pipe(ref, poses[:3] + _images(3, 11, size=(64, 32)), **run)
    with pytest.raises(ValueError, match="control_video is required"):
        pipe(ref, **run)
    with pytest.raises(ValueError, match="overlap must be in"):
        pipe(ref, poses, frames_per_batch=3, overlap=3, **run)
    with pytest.raises(ValueError, match=r"\(F, C, H, W\)"):
        pipe(ref, torch.rand(6, 64, 64), **run)
    with pytest.raises(TypeError, match="list of frames"):
        pipe(ref, "poses.mp4", **run)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(ref, torch.rand(6, 3, 64, 64) * 3, **run)
