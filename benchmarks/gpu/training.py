"""Part 3: training steps/s and peak memory at SDXL size: ControlNeXt (``controlnext train``'s step) against diffusers'
ControlNet training step, at the same batch, bf16 mixed precision, gradient checkpointing off and on.

ControlNeXt: the project's own pieces of ``controlnext train`` (``controlnext.training``): the published trainable set
(the whole ``sdxl`` control module plus the UNet's ``.*attn2.*to_out.*`` projections, selected by
``select_unet_parameters`` / ``apply_trainable``), its optimizer groups (``parameter_groups``, AdamW with
``TrainConfig``'s defaults), the ``ControlledBackbone`` wrapper the loop trains (module attached for each forward,
timestep-independent prefix recomputed so gradients reach it), frozen weights in bf16 and trained ones in float32
as the loop keeps them, bf16 autocast as accelerate's ``--mixed-precision bf16`` applies it, gradient clipping at
``max_grad_norm``; checkpointing on the UNet and the module, as ``--gradient-checkpointing`` does.
ControlNet: ``ControlNetModel.from_unet`` trained whole in float32 with the UNet frozen in bf16, residuals cast to
bf16, as diffusers' ``train_controlnet_sdxl.py`` does (its ``--gradient_checkpointing`` checkpoints the ControlNet).

One step = forward, MSE loss, backward, clip, optimizer step, zero grad, on precomputed random latents and text
embeddings (VAE and text encoders are outside the step, alike for both; they are frozen in both recipes). Batch:
``TrainConfig``'s default ``train_batch_size``. Timed with CUDA events after warm-up steps (which also create the
optimizer state); peak memory is ``max_memory_allocated`` over the timed steps (weights, gradients, optimizer state
and activations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from common import Item, MeasurementError, fmt_gib, fmt_s, markdown_table, status_cell


def _settings(smoke: bool) -> dict[str, Any]:
    from controlnext.training import TrainConfig

    batch = TrainConfig().train_batch_size
    if smoke:
        return dict(device="cpu", preset="ci-sdxl", batch=2, warmup=1, steps=2)
    return dict(device="cuda", preset="sdxl-1024", batch=batch, warmup=2, steps=4)


def measure(smoke: bool, method: str, checkpointing: bool) -> dict[str, Any]:
    """One training configuration: steps/s and peak memory."""
    import statistics

    import torch
    import torch.nn.functional as F

    from controlnext.bench import (
        PRESETS,
        StepClock,
        build_controlnet,
        build_controlnext,
        build_unet,
        make_inputs,
        peak_new_bytes,
    )
    from controlnext.families import get_family
    from controlnext.training import ControlledBackbone, TrainConfig
    from controlnext.training.trainable import (
        apply_trainable,
        parameter_groups,
        select_unet_parameters,
    )

    s = _settings(smoke)
    preset = PRESETS[s["preset"]]
    device = torch.device(s["device"])
    low = torch.bfloat16
    cfg = TrainConfig()
    batch = s["batch"]
    unet = build_unet(preset, device, low)  # frozen weights in the mixed-precision dtype
    inputs = make_inputs(unet, preset.resolution, batch, low, seed=0)
    cond = inputs.condition.float().expand(batch, -1, -1, -1).contiguous()
    added = inputs.added

    if method == "controlnext":
        module = build_controlnext(preset, "controlnext", unet, torch.float32)
        names = select_unet_parameters(unet, list(get_family(preset.family).trainable_patterns))
        trainable = apply_trainable(unet, module, names)
        params = dict(unet.named_parameters())
        for n in names:  # trained weights stay float32 for the optimizer
            params[n].data = params[n].data.float()
        groups = parameter_groups(unet, module, names, cfg.learning_rate, cfg.unet_learning_rate)
        model = ControlledBackbone(unet, module)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            module.enable_gradient_checkpointing()
        trained_count = trainable.control_trainable + trainable.unet_trainable
        model.train()
        models = [unet, module]

        def forward(t: torch.Tensor) -> torch.Tensor:
            return model(inputs.latents, t, encoder_hidden_states=inputs.text, condition=cond, added_cond_kwargs=added)

    elif method == "controlnet":
        controlnet = build_controlnet(unet, torch.float32).requires_grad_(True).train()
        groups = [{"params": list(controlnet.parameters()), "lr": cfg.learning_rate}]
        if checkpointing:
            controlnet.enable_gradient_checkpointing()
        trained_count = sum(p.numel() for p in controlnet.parameters())
        unet.train()
        models = [unet, controlnet]
        kw = {"added_cond_kwargs": added} if added is not None else {}

        def forward(t: torch.Tensor) -> torch.Tensor:
            down, mid = controlnet(
                inputs.latents, t, encoder_hidden_states=inputs.text, controlnet_cond=cond, return_dict=False, **kw
            )
            return unet(
                inputs.latents,
                t,
                encoder_hidden_states=inputs.text,
                down_block_additional_residuals=[d.to(low) for d in down],
                mid_block_additional_residual=mid.to(low),
                return_dict=False,
                **kw,
            )[0]

    else:
        raise ValueError(f"method must be 'controlnext' or 'controlnet', got {method!r}")

    trained = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(
        groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(inputs.latents.shape, generator=gen).to(device)

    def step() -> torch.Tensor:
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        with torch.autocast(device.type, dtype=low):
            pred = forward(t)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        missing = sum(p.grad is None for p in trained)
        if missing:
            raise MeasurementError(f"{missing} of {len(trained)} trained tensors got no gradient")
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # read after the timed steps: no host sync inside them

    clock = StepClock(device)
    for _ in range(s["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(s["steps"]):
        clock.start()
        losses.append(step())
        times.append(clock.stop())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # the profiler's allocation events (new bytes) over one more, untimed step, plus what is resident
        resident = _resident_bytes(models, optimizer)
        with peak_new_bytes(device) as new:
            losses.append(step())
        peak = resident + new[0]
    final = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in final):
        raise MeasurementError(f"the training loss is not finite: {final}")
    step_s = statistics.median(times)
    return dict(
        method=method,
        checkpointing=checkpointing,
        preset=s["preset"],
        resolution=preset.resolution,
        batch=batch,
        precision="bf16 autocast, trained weights float32",
        trained_params=trained_count,
        step_s=step_s,
        step_samples_s=[round(x, 6) for x in times],
        steps_per_second=1.0 / step_s,
        peak_bytes=peak,
    )


def _resident_bytes(models: list, optimizer) -> int:
    """Bytes of the weights and the optimizer state (on the CPU the peak meter sees only new allocations)."""
    import torch

    seen, total = set(), 0
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def items(smoke: bool) -> list[Item]:
    out: list[Item] = []
    for method in ("controlnext", "controlnet"):
        for checkpointing in (False, True):
            name = f"{method} checkpointing {'on' if checkpointing else 'off'}"
            out.append(
                Item(name, lambda m=method, c=checkpointing: [measure(smoke, m, c)], like=out[-1].name if out else None)
            )
    return out


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("method", lambda r: r["item"]),
    ("size", lambda r: f"{r['preset']} {r['resolution']} px, batch {r['batch']}" if "preset" in r else "-"),
    ("trained params", lambda r: f"{r['trained_params'] / 1e6:.1f}M" if "trained_params" in r else "-"),
    ("step", lambda r: fmt_s(r.get("step_s"))),
    ("steps/s", lambda r: f"{r['steps_per_second']:.2f}" if "steps_per_second" in r else "-"),
    ("peak memory", lambda r: fmt_gib(r.get("peak_bytes"))),
    ("status", status_cell),
]


def table(records: list[dict[str, Any]]) -> str:
    return markdown_table([h for h, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in records])
