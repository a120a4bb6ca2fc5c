"""The shipped demo: a small shapes text-to-image model with ControlNeXt modules for edges and masks.

Assets live inside the package (``controlnext/assets/demo``)::

    base/     a diffusers Stable Diffusion folder (vae, text_encoder, tokenizer, unet, scheduler), 64x64 pixels
    edges/    controlnext.safetensors (one file, published key layout), the trained UNet subset as deltas
              (unet_weight_increasements.safetensors, the SDXL release's name) + README.md (model card)
    mask/     the same for silhouette masks

:func:`run_demo` generates a fixed set of held-out (prompt, condition, seed) cases with and without control, writes
an image grid (condition | without control | with control) and returns the fidelity numbers of
:mod:`controlnext.shapes.metrics`. When the assets are absent (a trimmed install), it falls back to tiny *random* models
of the same layout, flagged as ``model: "random-untrained"`` in the result, so the command still runs end to end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .metrics import CONDITION_KINDS, evaluate_pipeline, reconstruction_ceiling
from .world import condition_image, render_sample

__all__ = [
    "DEMO_NAMES",
    "DEMO_SEED",
    "DemoResult",
    "demo_assets",
    "demo_cases",
    "demo_ref",
    "demo_sampling",
    "load_demo_pipeline",
    "run_demo",
    "save_grid",
]

#: Shapes seed of the demo and test cases: disjoint from the training data (base: seed 0, modules: seed 1).
DEMO_SEED = 1234
DEMO_STEPS = 20
# Guidance 3, not the usual 5-7.5: at 5 the shapes swell past their outlines (edge F1 0.66 vs 0.85 on the 8
# default cases) while the base's caption accuracy stays within 2 images of 64 (docs/demo.md, "Guidance").
DEMO_GUIDANCE = 3.0


def demo_sampling(steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance for the demo model: the given values, the demo's own where a value is None."""
    return (DEMO_STEPS if steps is None else steps, DEMO_GUIDANCE if guidance is None else guidance)


def demo_assets() -> Path | None:
    """Folder of the shipped demo model inside the package, or None when it is not installed."""
    root = Path(str(resources.files("controlnext") / "assets" / "demo"))
    return root if (root / "base" / "model_index.json").is_file() else None


#: Names of the shipped model accepted wherever a base model or a control module is: the base with its edges module,
#: the base with the edges or the mask module.
DEMO_NAMES = ("demo", "demo:edges", "demo:mask")


def demo_ref(name: str) -> tuple[Path, Path] | None:
    """(base folder, control module file) of a :data:`DEMO_NAMES` name, or None for any other model name.

    ``demo`` stands for ``demo:edges``. Raises FileNotFoundError for a demo name when the assets are not installed.
    """
    if str(name) not in DEMO_NAMES:
        return None
    root = demo_assets()
    if root is None:
        raise FileNotFoundError(f"{name}: the shipped demo model is not part of this installation (controlnext/assets)")
    condition = str(name).partition(":")[2] or "edges"
    return root / "base", root / condition / "controlnext.safetensors"


def demo_unet_weights(module_file: Path) -> Path | None:
    """The UNet weights shipped next to a demo module (its ``to_out`` deltas), or None when there are none."""
    from ..training.export import UNET_DELTAS_FILE, UNET_VALUES_FILE

    files = (module_file.parent / name for name in (UNET_DELTAS_FILE, UNET_VALUES_FILE))
    return next((f for f in files if f.is_file()), None)


def demo_cases(n: int, condition: str, seeds_per_prompt: int = 2, start: int = 0) -> tuple[list, list, list]:
    """``n`` held-out cases: (prompts, condition images uint8 (H, W, 3), generator seeds).

    Cases come in groups of ``seeds_per_prompt`` that share a prompt and condition but use different seeds.
    """
    samples = _demo_samples(n, seeds_per_prompt, start)
    return [s.caption for s in samples], [condition_image(s, condition) for s in samples], [
        i % seeds_per_prompt for i in range(n)
    ]


def _demo_samples(n: int, seeds_per_prompt: int = 2, start: int = 0) -> list:
    return [render_sample(DEMO_SEED, start + i // seeds_per_prompt) for i in range(n)]


def _random_pipeline(condition: str):
    """Tiny random models of the demo's layout: the command runs, but the numbers mean nothing."""
    import tempfile

    from ..pipelines import StableDiffusionControlNeXtPipeline
    from ..testing import tiny_controlnext, tiny_pipeline_components

    comps = tiny_pipeline_components("sd15", tempfile.mkdtemp(prefix="controlnext-demo-"))
    module = tiny_controlnext("sd15-training", out_channels=comps["unet"].config.block_out_channels[0])
    return StableDiffusionControlNeXtPipeline(**comps, controlnext=module)


def load_demo_pipeline(condition: str = "edges", allow_random: bool = True, root: Path | None = None):
    """The shipped base with its ``condition`` module, as a StableDiffusionControlNeXtPipeline; returns (pipe, kind).

    ``kind`` is ``"shipped"``, or ``"random-untrained"`` when the assets are missing and ``allow_random``.
    ``root`` reads a folder of the same layout instead of the package's assets (e.g. a rerun's output).
    """
    if condition not in CONDITION_KINDS:
        raise ValueError(f"condition must be one of {CONDITION_KINDS}, got {condition!r}.")
    root = demo_assets() if root is None else root
    module_file = root / condition / "controlnext.safetensors" if root else None
    if root is None or not module_file.is_file():
        if not allow_random:
            raise FileNotFoundError("The demo model is not part of this installation (controlnext/assets/demo).")
        return _random_pipeline(condition), "random-untrained"
    from ..loading import load_controlnext
    from ..pipelines import StableDiffusionControlNeXtPipeline

    module = load_controlnext(module_file)
    pipe = StableDiffusionControlNeXtPipeline.from_pretrained(str(root / "base"), controlnext=module)
    # The trained UNet subset ships next to the module, as the releases ship theirs (values or deltas).
    if (weights := demo_unet_weights(module_file)) is not None:
        pipe.load_unet_weights(weights, keep_base=True)
    return pipe, "shipped"


GRID_COLUMNS = ("condition", "without control", "with control")


def save_grid(
    path: Path,
    conditions: list,
    without: list,
    with_: list,
    zoom: int = 4,
    scores: list[tuple[float, float]] | None = None,
    metric: str = "",
    settings: dict[str, Any] | None = None,
) -> Path:
    """One row per case: condition | without control | with control, with column headers and each row's scores.

    Cells are upscaled ``zoom`` times with nearest-neighbour sampling (the pixels the model made, not a blur);
    ``scores`` holds each row's (without, with) fidelity, written beside the row under ``metric``'s name.
    ``settings`` (the run's command, model, module, condition, n, steps, guidance, seeds) go into the PNG's text
    chunks as the generation PNGs carry theirs: ``controlnext`` JSON (read back by
    :func:`controlnext.web.generation.read_settings`) and a one-line ``parameters`` text.
    """
    from PIL import ImageDraw, ImageFont, PngImagePlugin

    from ..web.generation import METADATA_KEY

    cell = np.asarray(conditions[0], np.uint8).shape[1] * zoom
    gap, header, side = 4, 28, 150 if scores is not None else 0
    font = ImageFont.load_default(size=16)
    width = 3 * cell + 2 * gap + (gap + side if side else 0)
    grid = Image.new("RGB", (width, header + len(conditions) * (cell + gap) - gap), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, title in enumerate(GRID_COLUMNS):
        draw.text((i * (cell + gap) + cell // 2, header // 2), title, fill="white", font=font, anchor="mm")
    if side:
        draw.text((3 * (cell + gap) + side // 2, header // 2), metric or "score", fill="white", font=font, anchor="mm")
    for r, row in enumerate(zip(conditions, without, with_)):
        y = header + r * (cell + gap)
        for i, img in enumerate(row):
            big = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
            grid.paste(big, (i * (cell + gap), y))
        if side:
            a, b = scores[r]
            x = 3 * (cell + gap) + 10
            draw.text((x, y + cell // 2 - 12), f"without {a:.2f}", fill="white", font=font, anchor="lm")
            draw.text((x, y + cell // 2 + 12), f"with    {b:.2f}", fill="white", font=font, anchor="lm")
    info = None
    if settings is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, json.dumps(settings, sort_keys=True, default=str))
        text = ", ".join(f"{k.replace('_', ' ').capitalize()}: {_text(v)}" for k, v in settings.items())
        info.add_text("parameters", text)
        info.add_text("Software", "controlnext")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG", pnginfo=info)
    return path


def _text(value: Any) -> str:
    """One ``parameters`` field value: lists joined by spaces, floats without trailing zeros."""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class DemoResult:
    condition: str
    model: str
    with_control: float
    without_control: float
    ceiling: float  # the metric on VAE round trips of the ground-truth images: the best a latent model can do
    per_case: list[dict]
    grid: Path | None
    seconds: float

    def as_json(self) -> dict:
        return {
            "fidelity": {
                "with_control": round(self.with_control, 4),
                "without_control": round(self.without_control, 4),
            },
            # The same metric on VAE round trips of the ground truth: the best a model with this VAE can score.
            "ceiling": round(self.ceiling, 4),
            "seconds": round(self.seconds, 2),
            "condition": self.condition,
            "metric": "mask IoU" if self.condition == "mask" else "edge F1 (2 px tolerance)",
            "model": self.model,
            "n": len(self.per_case),
            "grid": str(self.grid) if self.grid else None,
        }


def run_demo(
    condition: str = "edges",
    output: str | Path | None = "controlnext-demo",
    n: int = 8,
    steps: int = DEMO_STEPS,
    guidance: float = DEMO_GUIDANCE,
    start: float | None = None,
    progress: bool = False,
) -> DemoResult:
    """Run the demo for ``condition``; writes ``grid_<condition>.png`` and ``results_<condition>.json`` to ``output``.

    ``start``: a ``time.perf_counter()`` value to count the wall time from (default: now).
    """
    t0 = time.perf_counter() if start is None else start
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    torch.manual_seed(0)
    pipe, model = load_demo_pipeline(condition)
    prompts, conds, seeds = demo_cases(n, condition)
    report, with_, without = evaluate_pipeline(
        pipe, prompts, conds, condition, seeds, num_inference_steps=steps, guidance_scale=guidance, progress=progress
    )
    ceiling = reconstruction_ceiling(pipe.vae, [s.image for s in _demo_samples(n)], conds, condition)
    per_case = [
        {"prompt": p, "seed": s, "with_control": round(a, 4), "without_control": round(b, 4)}
        for p, s, a, b in zip(prompts, seeds, report.with_control, report.without_control)
    ]
    grid = None
    if output is not None:
        out = Path(output)
        scores = list(zip(report.without_control, report.with_control))
        metric = "mask IoU" if condition == "mask" else "edge F1"
        module = str(demo_assets() / condition / "controlnext.safetensors") if model == "shipped" else "random"
        settings = {"command": "demo", "model": model, "module": module, "condition": condition, "n": n,
                    "steps": steps, "guidance": guidance, "seeds": list(seeds)}  # fmt: skip
        grid = save_grid(
            out / f"grid_{condition}.png", conds, without, with_, scores=scores, metric=metric, settings=settings
        )
    result = DemoResult(condition, model, report.mean_with, report.mean_without, ceiling, per_case, grid, 0.0)
    result.seconds = time.perf_counter() - t0
    if output is not None:
        payload = dict(result.as_json(), cases=per_case)
        (Path(output) / f"results_{condition}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return result
