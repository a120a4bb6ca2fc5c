#!/usr/bin/env python
"""Train a control module (ControlNeXt, a diffusers ControlNet or T2I-Adapter) on the shapes data.

A minimal, deterministic training loop for ``benchmarks/convergence.py`` (the shipped demo modules are trained with
``controlnext train``, see ``scripts/train_demo_all.sh``), so every method sees the same base, data order, noise,
timesteps, batch size, steps and optimiser:

* base: a diffusers Stable Diffusion folder (``scripts/train_base.py``), frozen (VAE, text encoder and UNet);
* data: ``--n`` shapes samples rendered from ``--seed`` (latents = VAE posterior means x scaling_factor, text
  embeddings of the captions, condition images in [0, 1]), encoded once and kept in memory;
* objective: MSE to the base's prediction target (epsilon or v) at uniform timesteps, captions dropped (empty
  prompt) with p = 0.1, AdamW, constant LR after a 50-step warm-up, gradient clipping at 1;
* trainable: the control module only, except ``cross_norm_unet`` and ``timestep_free_unet``, which also train the UNet
  subset the published SD1.5 recipe unfreezes (every attention output projection, ``to_out``);
  ``timestep_free_unet`` is that recipe with an encoder without timestep input. ControlNeXt is applied with
  :func:`controlnext.attach` on the stock UNet (``cache_static=False`` so gradients reach the encoder's prefix);
  ControlNet is ``ControlNetModel.from_unet`` with its residuals passed to the UNet, as diffusers'
  ``train_controlnet.py`` does; ``t2i_adapter`` is diffusers' ``T2IAdapter`` (timestep-free, one residual per UNet
  down block, passed as ``down_intrablock_additional_residuals``, as ``train_t2i_adapter_sdxl.py`` does).

Usage: ``python scripts/train_demo_controlnext.py BASE OUT --condition edges --steps 1500 [--method M]``; writes
``OUT/controlnext.safetensors`` (one file, published key layout, config in its metadata; with the trained UNet
subset as ``OUT/unet_weight_increasements.safetensors`` deltas), or for ``controlnet`` / ``t2i_adapter`` the diffusers
folder ``OUT/controlnet`` / ``OUT/t2i_adapter``, and ``OUT/training.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from controlnext.shapes.world import condition_image, render_sample
from controlnext.training.objectives import ddpm_inputs, ddpm_loss

METHODS = ("cross_norm", "zero_conv", "controlnet", "cross_norm_unet", "timestep_free_unet", "t2i_adapter")

#: The demo's control-module size: the `sd15-training` structure (injected after down block 0) with fewer channels.
SMALL_CONTROLNEXT = dict(
    embedding_channels=(16, 16, 32),
    block_in_channels=(32, 32),
    block_out_channels=(32, 64),
    groups=(4, 8),
    mid_groups=8,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Base:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object  # the base's DDPMScheduler (noise schedule and prediction type)
    path: Path
    prediction_type: str
    _emb_cache: dict = field(default_factory=dict)

    def embed(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for captions (cached per caption)."""
        todo = sorted({c for c in captions if c not in self._emb_cache})
        if todo:
            tok = self.tokenizer(
                todo,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
                truncation=True,
            )
            with torch.no_grad():
                hid = self.text_encoder(tok.input_ids).last_hidden_state
            self._emb_cache.update(zip(todo, hid))
        return torch.stack([self._emb_cache[c] for c in captions])


def load_base(path: str | Path) -> Base:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return Base(vae, te, tok, unet, sched, path, sched.config.prediction_type)


@dataclass
class Data:
    latents: torch.Tensor  # (N, 4, h, w), scaled
    embeds: torch.Tensor  # (N, L, D)
    conditions: torch.Tensor  # (N, 3, H, W) in [0, 1]
    empty: torch.Tensor  # (L, D) embedding of the empty prompt


def condition_tensor(samples, condition: str) -> torch.Tensor:
    arr = np.stack([condition_image(s, condition) for s in samples])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def prepare_data(base: Base, condition: str, n: int, seed: int, size: int = 64, cache: Path | None = None) -> Data:
    """Render and encode ``n`` samples; with ``cache`` (a .pt path) the tensors are reused when already there."""
    if cache is not None and cache.is_file():
        return Data(**torch.load(cache, weights_only=True))
    lat, embs, conds = [], [], []
    for start in range(0, n, 256):
        samples = [render_sample(seed, i, size) for i in range(start, min(n, start + 256))]
        x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            lat.append(base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor)
        embs.append(base.embed([s.caption for s in samples]))
        conds.append(condition_tensor(samples, condition))
    data = Data(torch.cat(lat), torch.cat(embs), torch.cat(conds), base.embed([""])[0])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vars(data), cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    return data


class Method:
    """One trainable control method around the frozen base UNet: ``predict(xt, t, emb, cond)`` -> epsilon."""

    def __init__(self, name: str, base: Base, seed: int = 0):
        if name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {name!r}.")
        self.name, self.base = name, base
        self.unet_params: list[torch.nn.Parameter] = []
        torch.manual_seed(seed)
        unet = base.unet
        if name == "controlnet":
            from diffusers import ControlNetModel

            # Condition embedding downsamples by 2**(len-1) = 4, the VAE factor of this base.
            self.model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
            self.adapter = None
        elif name == "t2i_adapter":
            from diffusers import T2IAdapter

            # One residual per down block at the UNet's channels. This base's first block has no attention, so its
            # residual is added after its downsampler: sizes 1/8, 1/8, 1/16 of the image, the `full_adapter_xl` order.
            self.model = T2IAdapter(3, list(unet.config.block_out_channels), 2, 8, "full_adapter_xl")
            self.adapter = None
        else:
            from controlnext import ControlNeXtModel, attach
            from controlnext.families import get_family
            from controlnext.training.trainable import select_unet_parameters

            norm = "cross_norm" if name.endswith("_unet") else name
            self.model = ControlNeXtModel.from_variant(
                "sd15-training",
                out_channels=unet.config.block_out_channels[0],
                normalization=norm,
                use_timestep=name != "timestep_free_unet",
                **SMALL_CONTROLNEXT,
            )
            self.adapter = attach(unet, self.model, cache_static=False)
            if name.endswith("_unet"):
                names = set(select_unet_parameters(unet, list(get_family("sd15").trainable_patterns)))
                self.unet_params = [p.requires_grad_(True) for n, p in unet.named_parameters() if n in names]
        self.model.train()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + self.unet_params

    def predict(self, xt, t, emb, cond) -> torch.Tensor:
        unet = self.base.unet
        if self.name == "t2i_adapter":
            residuals = list(self.model(cond))  # the UNet pops from the list: a fresh one per call
            return unet(xt, t, emb, down_intrablock_additional_residuals=residuals).sample
        if self.adapter is None:
            down, mid = self.model(xt, t, emb, controlnet_cond=cond, return_dict=False)
            return unet(xt, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        self.adapter.slots[0].set_condition(cond)
        return unet(xt, t, emb).sample

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.detach()
            self.adapter = None
        self.model.eval()


def train(
    method: Method,
    data: Data,
    steps: int,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    uncond_prob: float = 0.1,
    warmup: int = 50,
    callback: Callable[[int], None] | None = None,
    callback_every: int = 0,
    log_every: int = 50,
) -> dict:
    """Train ``method`` for ``steps``; returns timing/loss stats. ``callback(step)`` runs every ``callback_every``."""
    params = method.params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)  # identical data/noise/timestep stream for every method
    num_t = method.base.scheduler.config.num_train_timesteps
    train_seconds, avg, losses = 0.0, None, []
    if callback and callback_every:
        callback(0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(data.latents), (batch,), generator=gen)
        x0, emb, cond = data.latents[idx], data.embeds[idx].clone(), data.conditions[idx]
        drop = torch.rand(batch, generator=gen) < uncond_prob
        emb[drop] = data.empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_t, (batch,), generator=gen)
        noisy, target = ddpm_inputs(method.base.scheduler, x0, noise, t, method.base.prediction_type)
        loss = ddpm_loss(method.predict(noisy, t, emb, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        train_seconds += time.perf_counter() - t0
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log(f"{method.name} step {step} loss {avg:.4f} ({train_seconds / step:.3f} s/step)")
        if callback and callback_every and step % callback_every == 0:
            method.model.eval()
            callback(step)
            method.model.train()
    return {"steps": steps, "seconds_per_step": train_seconds / max(steps, 1), "final_loss_avg": avg, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="base model folder (diffusers Stable Diffusion layout)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--condition", choices=("edges", "mask"), required=True)
    p.add_argument("--method", choices=METHODS, default="cross_norm")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n", type=int, default=8000, help="training samples")
    p.add_argument("--data-seed", type=int, default=1, help="shapes seed of the training data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    args = p.parse_args(argv)

    from controlnext.training.export import UNET_DELTAS_FILE, save_control_file, save_unet_subset

    torch.set_num_threads(args.threads)
    t_start = time.time()
    base = load_base(args.base)
    data = prepare_data(base, args.condition, args.n, args.data_seed)
    log(f"data: {len(data.latents)} samples, latents {tuple(data.latents.shape[1:])}")
    method = Method(args.method, base, seed=args.seed)
    n_params = sum(p.numel() for p in method.params)
    log(f"trainable parameters: {n_params}")
    args.out.mkdir(parents=True, exist_ok=True)
    unet_names = [n for n, p in base.unet.named_parameters() if p.requires_grad]
    base_values = {n: p.detach().clone() for n, p in base.unet.named_parameters() if n in unet_names}

    def save(step: int) -> None:
        if step == 0:
            return
        if args.method in ("controlnet", "t2i_adapter"):  # diffusers folders, as `controlnext eval --method` reads
            method.model.save_pretrained(args.out / args.method)
        else:  # the module in the published layout, and the trained UNet subset as deltas beside it
            save_control_file(method.model, args.out / "controlnext.safetensors")
            if unet_names:
                values = {n: p for n, p in base.unet.named_parameters() if n in unet_names}
                save_unet_subset(values, args.out / UNET_DELTAS_FILE, base_values)
        info = {
            "condition": args.condition,
            "method": args.method,
            "steps": step,
            "batch": args.batch,
            "lr": args.lr,
            "n_train": args.n,
            "data_seed": args.data_seed,
            "seed": args.seed,
            "threads": args.threads,
            "trainable_parameters": n_params,
            "seconds": round(time.time() - t_start),
            "base": str(args.base),
            "command": "python scripts/train_demo_controlnext.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"saved step {step} -> {args.out}")

    stats = train(
        method, data, args.steps, args.batch, args.lr, args.seed, callback=save, callback_every=args.save_every
    )
    if args.steps % args.save_every:
        save(args.steps)
    log(f"done: {stats['seconds_per_step']:.3f} s/step, final loss {stats['final_loss_avg']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
