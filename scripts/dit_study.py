#!/usr/bin/env python
"""The tiny DiT study: is control learned on a transformer base, at which injection block, and how does the light
module compare with diffusers' SD3ControlNetModel on the same base for the same steps? (docs/dit.md)

Stages, each one invocation that stays under ~10 minutes on one CPU thread (run them in this order):

    python scripts/dit_study.py base --steps 1279             # a tiny SD3-layout base, from scratch (resumable:
    python scripts/dit_study.py base --steps 2903             #   a second call continues to 2903 steps)
    python scripts/dit_study.py control --method after_block_0 --seed 0      # one control run: train + evaluate
    python scripts/dit_study.py control --method controlnet --seed 0
    python scripts/dit_study.py report                        # the markdown tables of every finished run

Setup. The shipped demo's trained VAE (4x: 64 px -> 16x16x4 latents) and text encoder (a small CLIP, 16 tokens)
are frozen and reused; the transformer is diffusers' stock ``SD3Transformer2DModel`` (patch 2: 8x8 image tokens;
10 joint blocks, 2 heads x 24), trained with the project's flow-matching objective (``training/objectives.py``:
logit-normal timesteps, preconditioned outputs, as ``train_controlnet_sd3.py``), 10 % empty captions, EMA 0.999,
on shapes seed 0. Control runs train on shapes seed 1 with ``edges`` conditions; the ControlNeXt module is the
``sd3`` variant's layout with the demo's small channel counts and ``token_patch=1`` (the demo VAE downsamples 4x, so
the token grid is 1/8 of the pixels, the encoder's own grid; ``two_block:`` methods: the earlier two-block layout),
trained with the family's default transformer subset
(image-stream attention output projections of the blocks after the injection point). The ControlNet is diffusers'
``SD3ControlNetModel.from_transformer(base, num_layers=3)`` fed the VAE latents of the condition, as the diffusers
script trains it (the transformer frozen). Same data order, noise, timesteps, LR and steps for every method.
Fidelity: edge F1 (2 px) of 16 held-out demo cases (shapes seed 1234), Euler 10 steps, guidance 5, fixed seeds;
with ``--condition mask`` the runs train on masks and score mask IoU (the JSON field is still ``edge_f1``).

``--layout flux`` (every stage; runs in ``runs/dit_study_flux``): the same study on a tiny ``FluxTransformer2DModel``
(``FLUX_BASE``: latents packed 2x2 into the same 8x8 tokens, rotary img/txt ids, t / 1000, as ``training/dit.py``
calls Flux; no guidance embedding, schnell-like, so guidance 5 is classifier-free guidance on a CFG batch; the demo's
CLIP as the only text encoder, its hidden states as the T5 stream and its pooled output as the pooled projection),
the same objective, data, schedules and evaluation. ControlNeXt is the ``flux`` variant with the same small channels
and the family's default subset; the ControlNet is diffusers' ``FluxControlNetModel.from_transformer`` with
``FLUX_CONTROLNET_LAYERS`` (double, single) blocks fed the packed condition latents, as ``train_controlnet_flux.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from controlnext.families import get_family
from controlnext.shapes.demo import demo_assets, demo_cases
from controlnext.shapes.metrics import mean_fidelity
from controlnext.shapes.world import condition_image, render_sample
from controlnext.training.core import ControlledBackbone, sample_generators
from controlnext.training.dit import pack_latents, transformer_kwargs
from controlnext.training.objectives import FlowMatching, flow_matching_inputs, flow_matching_loss, flow_matching_u

OBJECTIVE = FlowMatching(weighting_scheme="logit_normal", precondition_outputs=True)
BASE = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=10, attention_head_dim=24,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=48, pooled_projection_dim=64,
            pos_embed_max_size=16)  # fmt: skip
# The Flux counterpart: 16 in-channels are the 4 latent channels packed 2x2 (the same 8x8 tokens as SD3's patch 2),
# rotary axes summing to the head width; no guidance embedding (as schnell), so the evaluation's guidance is CFG.
FLUX_BASE = dict(patch_size=1, in_channels=16, num_layers=5, num_single_layers=10, attention_head_dim=24,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                 axes_dims_rope=(4, 10, 10))  # fmt: skip
LAYOUTS = {"sd3": ("SD3Transformer2DModel", BASE), "flux": ("FluxTransformer2DModel", FLUX_BASE)}
# The `sd3` variant's layout (stem to 1/4 through its max-pool, one residual block, features on the token grid) with
# the demo's small channel counts; `two_block:` methods use the earlier default, the light UNet layout's two blocks.
SMALL_CONTROLNEXT = dict(embedding_channels=(16, 16, 32), block_in_channels=(32,), block_out_channels=(64,),
                         groups=(4,), mid_groups=8, token_patch=1)  # fmt: skip
SMALL_TWO_BLOCK = dict(SMALL_CONTROLNEXT, embedding_maxpool=False, block_in_channels=(32, 32),
                       block_out_channels=(32, 64), groups=(4, 8))  # fmt: skip
POINTS = ("after_block_0", "after_block_4", "after_block_8")
METHODS = ("after_block_0", *(f"two_block:{p}" for p in POINTS), "two_block:module_only:after_block_0",
           "two_block:module_only:after_block_4", "single_out:after_block_0", "single_lora:after_block_0",
           "controlnet")  # fmt: skip
# `single_out:` also trains the single-stream blocks' output projections (Flux: attention and MLP share `proj_out`);
# `single_lora:` trains a rank-SINGLE_LORA_RANK LoRA (peft) on them instead.
SINGLE_OUT = r"^single_transformer_blocks\.\d+\.proj_out\."
SINGLE_LORA_RANK = 4

CONTROLNET_LAYERS = 3
FLUX_CONTROLNET_LAYERS = (2, 2)  # double-stream, single-stream blocks copied from the base
EVAL_CASES, EVAL_STEPS, GUIDANCE = 16, 10, 5.0
SUFFIX = {"edges": "", "mask": "-mask"}  # file names of the runs per condition kind
METRIC = {"edges": "edge F1", "mask": "mask IoU"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ frozen parts
class Frozen:
    """The demo's VAE and text encoder, and the flow-matching training scheduler."""

    def __init__(self):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        root = demo_assets() / "base"
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval().requires_grad_(False)
        self.text = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.sf = self.vae.config.scaling_factor
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)

    @torch.no_grad()
    def captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        out = self.text(ids)
        return out.last_hidden_state, out.pooler_output

    @torch.no_grad()
    def latents(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.cat([self.vae.encode(c).latent_dist.mean for c in x.split(64)]) * self.sf

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents / self.sf).sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def dataset(frozen: Frozen, seed: int, n: int, cache: Path) -> dict[str, torch.Tensor]:
    """Latents, caption states, conditions (edges or masks, in [0, 1]) and condition latents of ``n`` samples."""
    if cache.is_file():
        return torch.load(cache)
    samples = [render_sample(seed, i) for i in range(n)]
    captions = sorted({s.caption for s in samples} | {""})
    states, pooled = frozen.captions(captions)
    index = torch.tensor([captions.index(s.caption) for s in samples])
    cond = np.stack([condition_image(s, ARGS.condition) for s in samples])
    data = dict(
        latents=frozen.latents(np.stack([s.image for s in samples])),
        caption=index,
        states=states,
        pooled=pooled,
        empty=torch.tensor(captions.index("")),
        cond=torch.from_numpy(cond).permute(0, 3, 1, 2).float() / 255,
        cond_latents=frozen.latents(cond),
    )
    torch.save(data, cache)
    return data


# ------------------------------------------------------------------------------------------------ one step
def pack(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, 4, 16, 16) as the base takes them: unchanged for SD3, 2x2-packed tokens for Flux."""
    return pack_latents(ARGS.layout, latents)


def unpack(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`, to the shape of the latents ``like``."""
    if ARGS.layout == "sd3":
        return x
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, *like.shape[-2:], 1)  # sizes in latents: a "VAE factor" of 1


def base_kwargs(base, latents: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> dict:
    """The base's call arguments besides the sample (``latents``: unpacked, for their grid): SD3's timestep and
    text; Flux's t / 1000, text and rotary ids, without guidance embedding."""
    return transformer_kwargs(ARGS.layout, latents, t, states, pooled, None, base)


def batch_inputs(data, rows: torch.Tensor, step: int, seed: int, base, drop: float = 0.1):
    """Targets, noise, noisy latents (packed for the base), sigmas and the base's call arguments of a batch; every
    draw from per-sample generators (same for every method with the same seed)."""
    gens = sample_generators(seed, step, 0, 0, len(rows))
    latents = data["latents"][rows]
    noise = pack(torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]))
    u = flow_matching_u(OBJECTIVE, gens)
    keep = torch.tensor([torch.rand((), generator=g).item() >= drop for g in gens])
    caption = torch.where(keep, data["caption"][rows], data["empty"])
    x0 = pack(latents)
    noisy, t, sigmas = flow_matching_inputs(FROZEN.scheduler, x0, noise, u)
    return x0, noise, noisy, sigmas, base_kwargs(base, latents, t, data["states"][caption], data["pooled"][caption])


def order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def batches(n: int, batch: int, seed: int, start: int, steps: int):
    per_epoch = n // batch
    for step in range(start, steps):
        perm = order(n, seed, step // per_epoch)
        k = step % per_epoch
        yield step, perm[k * batch : (k + 1) * batch]


# ------------------------------------------------------------------------------------------------ base
def base_class() -> type:
    import diffusers

    return getattr(diffusers, LAYOUTS[ARGS.layout][0])


def make_base():
    torch.manual_seed(0)
    return base_class()(**LAYOUTS[ARGS.layout][1])


def train_base(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset(FROZEN, 0, args.n, out / "data-seed0.pt")
    model = make_base()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, ckpt = 0, out / "base-checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"base: resumed at step {start}")
    log(f"base: {sum(p.numel() for p in model.parameters()):,} parameters, steps {start} -> {args.steps}")
    t0, losses, end = time.time(), [], args.steps
    for step, rows in batches(len(data["latents"]), args.batch, 0, start, args.steps):
        if time.time() - t0 > args.budget:  # stay within one invocation's time; the next call continues
            end = step
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        x0, noise, noisy, sigmas, kw = batch_inputs(data, rows, step, 0, model)
        pred = model(noisy, return_dict=False, **kw)[0]
        loss = flow_matching_loss(OBJECTIVE, pred, noisy, x0, noise, sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - min(0.999, (step + 1) / (step + 10)))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            rate = (time.time() - t0) / len(losses)
            log(f"base step {step + 1}: loss {np.mean(losses[-100:]):.4f} ({rate:.2f} s/step)")
    torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=end), ckpt)
    ema.save_pretrained(out / "base")
    score = evaluate(ema, None, "base")
    (out / "base.json").write_text(json.dumps(dict(steps=end, edge_f1=score, loss=float(np.mean(losses[-100:])))))
    log(f"base: {end} steps, edge F1 without control {score:.3f}")


# ------------------------------------------------------------------------------------------------ control
class Method:
    """A control method on the frozen base: ``pred(noisy, kw, cond, cond_latents)`` and its trained parameters."""

    def __init__(self, name: str, base, seed: int):
        torch.manual_seed(seed)
        self.name, self.base = name, base
        *flags, point = name.split(":")  # e.g. two_block:module_only:after_block_4
        base.requires_grad_(False)
        if name == "controlnet" and ARGS.layout == "flux":
            from diffusers import FluxControlNetModel

            # As train_controlnet_flux.py: the first double and single blocks copied, the condition's embedding zeroed.
            double, single = FLUX_CONTROLNET_LAYERS
            self.net = FluxControlNetModel.from_transformer(
                base, num_layers=double, num_single_layers=single, attention_head_dim=base.config.attention_head_dim,
                num_attention_heads=base.config.num_attention_heads,
            )  # fmt: skip
            self.params = list(self.net.parameters())
        elif name == "controlnet":
            from diffusers import SD3ControlNetModel

            # As train_controlnet_sd3.py: the first blocks copied, the condition latents' patch embedding zeroed.
            self.net = SD3ControlNetModel.from_transformer(
                base, num_layers=CONTROLNET_LAYERS, num_extra_conditioning_channels=0
            )
            self.params = list(self.net.parameters())
        else:
            from controlnext.models.controlnext import ControlNeXtModel
            from controlnext.training.trainable import select_unet_parameters

            self.net = ControlNeXtModel.from_variant(
                ARGS.layout, out_channels=base.config.num_attention_heads * base.config.attention_head_dim,
                injection_point=point, **(SMALL_TWO_BLOCK if "two_block" in flags else SMALL_CONTROLNEXT),
            )  # fmt: skip
            lora = []
            if "single_lora" in flags:
                from peft import LoraConfig

                config = LoraConfig(r=SINGLE_LORA_RANK, lora_alpha=SINGLE_LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=r"single_transformer_blocks\.\d+\.proj_out")  # fmt: skip
                base.add_adapter(config)
                lora = [p for n, p in base.named_parameters() if "lora_" in n]
            self.model = ControlledBackbone(base, self.net)
            patterns = [] if "module_only" in flags else get_family(ARGS.layout).trainable(point)
            patterns += [SINGLE_OUT] if "single_out" in flags else []
            params = dict(base.named_parameters())
            names = select_unet_parameters(base, patterns)
            for n in names:
                params[n].requires_grad_(True)
            self.params = list(self.net.parameters()) + [params[n] for n in names] + lora

    def pred(self, noisy, kw, cond, cond_latents):
        """The prediction for ``noisy`` (packed) with the base's call arguments ``kw``; ``cond`` the condition images
        (ControlNeXt), ``cond_latents`` their VAE latents, unpacked (the ControlNet)."""
        if self.name == "controlnet" and ARGS.layout == "flux":
            double, single = self.net(hidden_states=noisy, controlnet_cond=pack(cond_latents), return_dict=False, **kw)
            return self.base(noisy, controlnet_block_samples=double, controlnet_single_block_samples=single,
                             return_dict=False, **kw)[0]  # fmt: skip
        if self.name == "controlnet":
            res = self.net(hidden_states=noisy, controlnet_cond=cond_latents, return_dict=False, **kw)[0]
            return self.base(noisy, block_controlnet_hidden_states=res, return_dict=False, **kw)[0]
        return self.model(noisy, condition=cond, **kw)


@torch.no_grad()
def evaluate(base, method: Method | None, label: str) -> float:
    """Mean fidelity (edge F1, or mask IoU) of the held-out cases (Euler, guidance 5); without ``method``: the base
    alone."""
    prompts, conds, seeds = demo_cases(EVAL_CASES, ARGS.condition)
    states, pooled = FROZEN.captions(prompts)
    e_states, e_pooled = FROZEN.captions([""] * len(prompts))
    cond = torch.from_numpy(np.stack(conds)).permute(0, 3, 1, 2).float() / 255
    cond_latents = FROZEN.latents(np.stack(conds))
    x0 = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(100 + s + 2 * i))
                      for i, s in enumerate(seeds)])  # fmt: skip
    x = pack(x0)  # the scheduler's step is elementwise: it runs on the packed tokens
    sched = copy.deepcopy(FROZEN.scheduler)
    sched.set_timesteps(EVAL_STEPS)
    if method is not None:  # the base has no dropout: only the method's mode matters
        method.net.eval()
    for t in sched.timesteps:
        x2 = torch.cat([x, x])
        kw = base_kwargs(base, torch.cat([x0, x0]), t.expand(len(x2)), torch.cat([e_states, states]),
                         torch.cat([e_pooled, pooled]))  # fmt: skip
        if method is None:
            v = base(x2, return_dict=False, **kw)[0]
        else:
            v = method.pred(x2, kw, torch.cat([cond, cond]), torch.cat([cond_latents, cond_latents]))
        uncond, text = v.chunk(2)
        x = sched.step(uncond + GUIDANCE * (text - uncond), t, x).prev_sample
    if method is not None:
        method.net.train()
    images = FROZEN.decode(unpack(x, x0))
    if label:
        np.save(Path(ARGS.out) / f"samples-{label}.npy", images)
    return float(np.mean(mean_fidelity(list(images), conds, ARGS.condition)))


def train_control(args) -> None:
    out = Path(args.out)
    base = base_class().from_pretrained(out / "base")
    data = dataset(FROZEN, 1, args.n, out / f"data-seed1{SUFFIX[args.condition]}.pt")
    method = Method(args.method, base, args.seed)
    trained = sum(p.numel() for p in method.params)
    log(f"{args.method} seed {args.seed}: {trained:,} trained parameters")
    opt = torch.optim.AdamW(method.params, lr=args.lr, weight_decay=0.01)
    history = [dict(step=0, edge_f1=evaluate(base, method, ""))]
    t0, losses, train_s = time.time(), [], 0.0
    for step, rows in batches(len(data["latents"]), args.batch, args.seed, 0, args.steps):
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        x0, noise, noisy, sigmas, kw = batch_inputs(data, rows, step, 1000 + args.seed, base)
        pred = method.pred(noisy, kw, data["cond"][rows], data["cond_latents"][rows])
        loss = flow_matching_loss(OBJECTIVE, pred, noisy, x0, noise, sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.params, 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        train_s += time.time() - ts
        if (step + 1) % args.eval_every == 0:
            label = f"{args.method.replace(':', '-')}{SUFFIX[args.condition]}-seed{args.seed}"
            label = label if step + 1 == args.steps else ""
            score = evaluate(base, method, label)
            history.append(dict(step=step + 1, edge_f1=score, loss=float(np.mean(losses[-50:]))))
            log(f"  step {step + 1}: loss {history[-1]['loss']:.4f}, fidelity {history[-1]['edge_f1']:.3f}")
    result = dict(method=args.method, seed=args.seed, lr=args.lr, steps=args.steps, batch=args.batch,
                  trained_params=trained, s_per_step=train_s / args.steps, history=history,
                  wall_s=time.time() - t0)  # fmt: skip
    results = out / f"results{SUFFIX[args.condition]}"
    results.mkdir(exist_ok=True)
    (results / f"{args.method.replace(':', '-')}-seed{args.seed}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ report
def report(args) -> None:
    out = Path(args.out)
    base = json.loads((out / "base.json").read_text())
    runs: dict[str, list[dict]] = {}
    for f in sorted((out / f"results{SUFFIX[args.condition]}").glob("*.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["method"], []).append(r)
    if args.save:  # the raw numbers, for the repository
        Path(args.save).write_text(json.dumps(dict(base=base, runs=runs), indent=1) + "\n")
    if args.condition == "mask":  # the ControlNet's zero-initialised input: its step 0 is the base alone
        base = dict(steps=base["steps"], edge_f1=runs["controlnet"][0]["history"][0]["edge_f1"])
    metric = METRIC[args.condition]
    print(f"Base alone (no control), {base['steps']} steps: {metric} **{base['edge_f1']:.3f}**.\n")
    print(f"| method | trained params | s/step | seeds | {metric} @ end | mean {metric} over evaluations after 0 |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        rs = runs.get(name)
        if not rs:
            continue
        end = np.array([r["history"][-1]["edge_f1"] for r in rs])
        auc = np.array([np.mean([h["edge_f1"] for h in r["history"][1:]]) for r in rs])
        seeds = ", ".join(str(r["seed"]) for r in rs)
        sd = lambda a: f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else ""  # noqa: E731
        per_seed = ", ".join(f"{v:.3f}" for v in end)
        print(f"| {name} | {rs[0]['trained_params']:,} | {np.mean([r['s_per_step'] for r in rs]):.3f} | {seeds} | "
              f"{end.mean():.3f}{sd(end)} ({per_seed}) | {auc.mean():.3f}{sd(auc)} |")  # fmt: skip
    print(f"\nSeed-mean {metric} against steps:\n")
    names = [n for n in METHODS if n in runs]
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    steps = [h["step"] for h in runs[names[0]][0]["history"]]
    for i, s in enumerate(steps):
        cells = [np.mean([r["history"][i]["edge_f1"] for r in runs[n] if len(r["history"]) > i]) for n in names]
        print(f"| {s} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    global ARGS, FROZEN
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("base", "control", "report"))
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="sd3", help="the base transformer's layout")
    p.add_argument("--out", default=None, help="default: runs/dit_study (sd3), runs/dit_study_flux (flux)")
    p.add_argument("--method", choices=METHODS, default="after_block_0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="base: 2903 (resumable); control: 400")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="base: 1e-3; control: 1e-3")
    p.add_argument("--n", type=int, default=4000, help="training samples of the stage")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--condition", choices=tuple(SUFFIX), default="edges", help="control: the condition kind")
    p.add_argument("--budget", type=float, default=540, help="base: at most this many seconds of training per call")
    p.add_argument("--save", default=None, help="report: also write every run's numbers to this JSON file")
    ARGS = p.parse_args(argv)
    ARGS.out = ARGS.out or {"sd3": "runs/dit_study", "flux": "runs/dit_study_flux"}[ARGS.layout]
    torch.set_num_threads(ARGS.threads)
    if ARGS.stage == "report":
        report(ARGS)
        return 0
    FROZEN = Frozen()
    ARGS.lr = ARGS.lr or 1e-3
    if ARGS.stage == "base":
        ARGS.steps = ARGS.steps or 2903
        train_base(ARGS)
    else:
        ARGS.steps = ARGS.steps or 400
        train_control(ARGS)
    return 0


ARGS: argparse.Namespace
FROZEN: Frozen

if __name__ == "__main__":
    sys.exit(main())
