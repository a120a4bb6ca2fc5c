#!/usr/bin/env python
"""Train the small text-to-image base model shipped as the demo's base, on CPU, from the procedural shapes data.

Output: a standard diffusers Stable Diffusion folder (model_index.json, vae/, text_encoder/, tokenizer/, unet/,
scheduler/) that ``StableDiffusionPipeline.from_pretrained`` loads. Stages, each with a wall-time budget:

1. VAE: ``AutoencoderKL`` with three blocks (4x spatial factor: 64x64 RGB -> 16x16x4 latents; an 8x factor would
   leave 8x8 latents, too coarse for shapes this small), trained on random 32x32 crops (it is fully convolutional;
   crops cut the cost 4x) with L1 + MSE and a tiny KL term. ``scaling_factor`` is set to 1/std of the latents.
2. Latents of ``--n-train`` samples are encoded once (posterior means) and cached.
3. Text encoder (a small CLIP with a word-level vocabulary, trained jointly) and ``UNet2DConditionModel``: epsilon
   prediction, DDPM "linear" betas (its terminal SNR is lower than SD's scaled_linear one, which matters for flat
   black/white backgrounds at this size), Min-SNR-5 loss weighting, 10 % empty captions for classifier-free guidance,
   EMA of the weights (what is saved). A complete checkpoint is written every ``--save-every`` seconds (atomically),
   so an interrupted run still leaves usable weights.

Runs on one thread by default (``--threads``) so a shared machine keeps a core free. Deterministic given the seed
and thread count (up to the time budgets: pass ``--unet-steps``/``--vae-steps`` to fix the step counts instead).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from controlnext.shapes.world import VOCABULARY, render_sample
from controlnext.training.objectives import ddpm_inputs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_arrays(seed: int, start: int, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    samples = [render_sample(seed, i, size) for i in range(start, start + count)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [s.caption for s in samples]


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_text_encoder(out: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from controlnext.testing.models import write_tiny_clip_tokenizer

    tok_dir = write_tiny_clip_tokenizer(out / "tokenizer_src", VOCABULARY)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg), tokenizer


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=8,
        # Cross-attention at 8x8 and 4x4 only: at 16x16 it would double the cost for little gain on these captions.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def make_scheduler(prediction_type: str = "v_prediction"):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        steps_offset=1,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
    )


def train_vae(args, out: Path):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    t0, step, idx = time.time(), 0, 10_000_000  # VAE data: indices disjoint from the UNet's
    while True:
        if args.vae_steps and step >= args.vae_steps:
            break
        if not args.vae_steps and time.time() - t0 > args.vae_seconds:
            break
        x, _ = render_arrays(args.seed, idx, args.vae_batch, args.size)
        idx += args.vae_batch
        c = args.vae_crop
        oy, ox = rng.integers(0, args.size - c + 1, 2)
        x = x[:, :, oy : oy + c, ox : ox + c]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (c * c * 3)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f} ({(time.time() - t0) / step:.2f} s/step)")
    vae.eval()
    with torch.no_grad():
        x, _ = render_arrays(args.seed + 99, 0, 64, args.size)
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample
        psnr = 10 * math.log10(4.0 / F.mse_loss(rec, x).item())
        std = lat.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae done: {step} steps, {time.time() - t0:.0f} s, held-out PSNR {psnr:.1f} dB, latent std {std:.3f}")
    return vae, {"vae_steps": step, "vae_seconds": round(time.time() - t0), "vae_psnr_db": round(psnr, 2)}


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, extra: dict) -> None:
    """Write a complete StableDiffusionPipeline folder atomically (to a temp folder, then renamed)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(extra["prediction_type"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (a diffusers Stable Diffusion layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-seconds", type=float, default=360)
    p.add_argument("--vae-steps", type=int, default=0, help="fixed VAE step count (overrides --vae-seconds)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae", type=Path, default=None, help="reuse the VAE of this model folder (skips stage 1)")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from this model folder: its VAE, text encoder, tokenizer and UNet (implies --vae)",
    )
    p.add_argument(
        "--prediction-type",
        choices=("v_prediction", "epsilon"),
        default="v_prediction",
        help="v (default): with these betas the terminal SNR is tiny, and an epsilon model's x0 estimate at high "
        "noise is too inaccurate for few-step deterministic samplers",
    )
    p.add_argument("--n-train", type=int, default=16000)
    p.add_argument("--unet-seconds", type=float, default=2700)
    p.add_argument("--unet-steps", type=int, default=0, help="fixed UNet step count (overrides --unet-seconds)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="after the warm-up: constant, or cosine decay to 0 at --unet-steps (which it requires)",
    )
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--save-every", type=float, default=300, help="seconds between checkpoints")
    args = p.parse_args(argv)
    if args.lr_schedule == "cosine" and not args.unet_steps:
        p.error("--lr-schedule cosine needs a fixed --unet-steps")
    if args.init is not None:
        args.vae = args.init

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.out.with_name(args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"train_base {vars(args)}")

    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae" if (args.vae / "vae").is_dir() else None)
        vae.eval()
        prev = args.vae / "training.json"
        info = {k: v for k, v in json.loads(prev.read_text()).items() if k.startswith("vae_")} if prev.is_file() else {}
        info["vae_from"] = str(args.vae)
        log(f"using the trained VAE of {args.vae}")
    else:
        vae, info = train_vae(args, work)
    vae.requires_grad_(False)

    # Cache latents (posterior means, scaled) and token ids of the UNet's training set.
    t0 = time.time()
    lats, caps = [], []
    with torch.no_grad():
        for start in range(0, args.n_train, 256):
            x, c = render_arrays(args.seed, start, min(256, args.n_train - start), args.size)
            lats.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            caps += c
    lats = torch.cat(lats)
    log(f"encoded {len(lats)} latents {tuple(lats.shape[1:])} in {time.time() - t0:.0f} s, std {lats.std():.3f}")

    torch.manual_seed(args.seed)
    if args.init is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(args.init, subfolder="tokenizer")
        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet")
        prev = args.init / "training.json"
        info["init"] = json.loads(prev.read_text()) if prev.is_file() else str(args.init)
        log(f"continuing from the text encoder and UNet of {args.init}")
    else:
        text_encoder, tokenizer = make_text_encoder(work)
        unet = make_unet()
    ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    log(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters"
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / args.warmup)
        if args.lr_schedule == "constant" or s < args.warmup:
            return warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - args.warmup) / max(1, args.unet_steps - args.warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())

    from diffusers import DDPMScheduler

    # The sampling scheduler's betas; its DDPM twin gives the forward process (add_noise, get_velocity).
    noise_sched = DDPMScheduler.from_config(make_scheduler(args.prediction_type).config)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    gen = torch.Generator().manual_seed(args.seed)
    t0, last_save, step, avg = time.time(), time.time(), 0, None

    def checkpoint(final: bool = False) -> None:
        extra = dict(
            info,
            seed=args.seed,
            unet_steps=step,
            unet_seconds=round(time.time() - t0),
            total_seconds=round(time.time() - t_start),
            batch=args.batch,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            ema=args.ema,
            n_train=args.n_train,
            threads=args.threads,
            prediction_type=args.prediction_type,
            final=final,
            command="python scripts/train_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        save_pipeline(args.out, vae, ema_te, tokenizer, ema_unet, extra)
        log(f"saved checkpoint at step {step} -> {args.out}")

    unet.train()
    text_encoder.train()
    while True:
        if args.unet_steps and step >= args.unet_steps:
            break
        if not args.unet_steps and time.time() - t0 > args.unet_seconds:
            break
        b = torch.randint(0, len(lats), (args.batch,), generator=gen)
        x0 = lats[b]
        tok = ids[b].clone()
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        xt, target = ddpm_inputs(noise_sched, x0, noise, t, args.prediction_type)
        enc = text_encoder(tok).last_hidden_state
        pred = unet(xt, t, enc).sample
        snr = snr_all[t]  # min-SNR weights from alphas_cumprod directly (the shipped base was trained so)
        w = torch.clamp(snr, max=args.min_snr) / (snr + 1 if args.prediction_type == "v_prediction" else snr)
        loss = (w * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"unet step {step} loss {avg:.4f} ({(time.time() - t0) / step:.2f} s/step)")
        if time.time() - last_save > args.save_every:
            checkpoint()
            last_save = time.time()
    checkpoint(final=True)
    log(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
