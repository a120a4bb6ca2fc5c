"""The evaluation protocol: generate each (prompt, condition) with and without control, for one or more control
methods on one base model, and score every requested metric; report as a markdown table and a JSON-able dict.

Methods: a ControlNeXt module (:class:`controlnext.pipelines.StableDiffusionControlNeXtPipeline`), a diffusers
``ControlNetModel`` (``StableDiffusionControlNetPipeline``) or a diffusers ``T2IAdapter``
(``StableDiffusionAdapterPipeline``). "Without control" is the same call with the control scale at 0 (and, for
ControlNeXt, the UNet's base weights), same seeds: the base model alone.

Each metric is skipped, with the reason recorded, when its annotator model was not given or the split lacks its
input (FID needs the split's images, segmentation mIoU its label maps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics as M

__all__ = [
    "CONDITIONS",
    "METHODS",
    "METRICS",
    "PROTOCOLS",
    "EvalModels",
    "MethodResult",
    "Metric",
    "applicable_metrics",
    "evaluate_methods",
    "generate",
    "load_method",
    "MetricAccumulator",
    "markdown_table",
]

METHODS = ("controlnext", "controlnet", "t2i-adapter")
CONDITIONS = ("edges", "mask", "canny", "hed", "depth", "seg")
# The ControlNet++ protocol (arXiv 2404.07987): SD1.5, 20 denoising steps, classifier-free guidance 7.5,
# 4 images per condition in its scripts (group_0..group_3).
PROTOCOLS = {"controlnet++": {"steps": 20, "guidance": 7.5, "images_per_condition": 4}}


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    conditions: tuple[str, ...] | None  # None: every condition type
    higher_is_better: bool
    model: str | None = None  # the EvalModels field it needs


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("edge-f1", "edge F1 (2 px tol.)", ("edges",), True),
        Metric("mask-iou", "mask IoU", ("mask",), True),
        Metric("canny-f1", "Canny F1 x100", ("edges", "canny"), True),
        Metric("hed-ms-ssim", "HED MS-SSIM", ("hed",), True, "hed"),
        Metric("depth-rmse", "depth RMSE", ("depth",), False, "depth"),
        Metric("seg-miou", "ADE20K mIoU x100", ("seg",), True, "segmenter"),
        Metric("clip-score", "CLIP score", None, True, "clip"),
        Metric("fid", "FID", None, False, "inception"),
    )
}


def applicable_metrics(condition: str) -> list[str]:
    """The metrics that measure a ``condition``-type control (plus the condition-free CLIP score and FID)."""
    return [m.name for m in METRICS.values() if m.conditions is None or condition in m.conditions]


@dataclass
class EvalModels:
    """Local annotator model paths (None: the metrics that need the model are skipped)."""

    hed: str | Path | None = None
    depth: str | Path | None = None
    segmenter: str | Path | None = None
    clip: str | Path | None = None
    inception: str | Path | None = None
    device: str = "cpu"
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self, name: str):
        if name not in self._loaded:
            from . import models

            path = getattr(self, name)
            loader = {
                "hed": models.HEDDetector.from_file,
                "depth": models.DepthEstimator,
                "segmenter": models.Segmenter,
                "clip": models.load_clip,
                "inception": models.load_inception,
            }[name]
            self._loaded[name] = loader(path, self.device)
        return self._loaded[name]


def derive_condition(condition: str, image: np.ndarray, models: EvalModels) -> np.ndarray:
    """The ``condition``-type map of a ground-truth image ((H, W, 3) uint8), as the protocol derives Canny and HED
    conditions of MultiGen-20M from its images."""
    need = {"hed": ("hed", "--hed-model"), "depth": ("depth", "--depth-model")}.get(condition)
    if need and getattr(models, need[0]) is None:
        raise ValueError(f"Deriving {condition} conditions from the split's images needs {need[1]}.")
    if condition == "canny":
        grey = M.canny_map(image).astype(np.uint8) * 255
    elif condition == "hed":
        grey = models.get("hed")(image)
    elif condition == "depth":
        grey = models.get("depth")(image)
    else:
        raise ValueError(f"A {condition!r} condition cannot be derived from the image; give a condition column.")
    return np.repeat(grey[..., None], 3, axis=2)


def load_method(
    method: str,
    base: str,
    module: str,
    unet_weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """The stock pipeline of ``method`` on ``base`` with the control model at ``module``, on ``device`` in
    ``dtype`` (None: as stored)."""
    if method == "controlnext":
        from ..pipelines import StableDiffusionControlNeXtPipeline

        pipe = StableDiffusionControlNeXtPipeline.from_pretrained(base, torch_dtype=dtype)
        pipe.load_controlnext(module)  # takes the backbone's device and dtype
        if unet_weights:
            pipe.load_unet_weights(unet_weights, keep_base=True)
        return pipe.to(device)
    if unet_weights:
        raise ValueError("--unet-weights goes with a ControlNeXt module only.")
    import diffusers

    model_cls, pipe_cls, arg = {
        "controlnet": (diffusers.ControlNetModel, diffusers.StableDiffusionControlNetPipeline, "controlnet"),
        "t2i-adapter": (diffusers.T2IAdapter, diffusers.StableDiffusionAdapterPipeline, "adapter"),
    }[method]
    folder = Path(module)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{module} is not a diffusers {model_cls.__name__} folder (config.json and weights) for --method {method}."
        )
    control = model_cls.from_pretrained(str(folder), torch_dtype=dtype)
    return pipe_cls.from_pretrained(
        base,
        **{arg: control},
        torch_dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)


def _call_kwargs(method: str, pipe, conditions: Sequence[np.ndarray], scale: float) -> dict:
    from PIL import Image

    if method == "controlnext":  # the same input as shapes.metrics.evaluate_pipeline gives it
        conds = [torch.from_numpy(c.astype(np.float32) / 255.0).permute(2, 0, 1) for c in conditions]
        return {"control_image": conds, "controlnext_conditioning_scale": scale}
    images = [Image.fromarray(c) for c in conditions]
    if method == "t2i-adapter" and pipe.adapter.config.in_channels == 1:  # e.g. the Canny adapters take grey
        images = [im.convert("L") for im in images]
    key = "controlnet_conditioning_scale" if method == "controlnet" else "adapter_conditioning_scale"
    return {"image": images, key: scale}


def generate(
    method: str,
    pipe,
    prompts: Sequence[str],
    conditions: Sequence[np.ndarray],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    scale: float,
    batch_size: int = 16,
    progress: bool = False,
) -> list[np.ndarray]:
    """Image ``i`` for ``(prompts[i], conditions[i])`` with ``torch.Generator().manual_seed(seeds[i])``, uint8 RGB.

    ``scale == 0`` is the base model alone (for ControlNeXt also with the UNet's base weights)."""
    from ..shapes.metrics import to_uint8_rgb

    _check_sizes(conditions)
    pipe.set_progress_bar_config(disable=not progress)
    out: list[np.ndarray] = []
    base = method == "controlnext" and scale == 0
    with pipe.base_unet_weights() if base else nullcontext():
        for batch in _batches([c.shape[:2] for c in conditions], batch_size):
            h, w = conditions[batch[0]].shape[:2]
            res = pipe(
                prompt=[prompts[i] for i in batch],
                **_call_kwargs(method, pipe, [conditions[i] for i in batch], scale),
                height=h,
                width=w,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(int(seeds[i])) for i in batch],
                output_type="np",
            )
            out += [to_uint8_rgb(im) for im in res.images]
    return out


def _check_sizes(conditions: Sequence[np.ndarray]) -> None:
    odd = sorted({c.shape[:2] for c in conditions if c.shape[0] % 8 or c.shape[1] % 8})
    if odd:
        raise ValueError(
            f"Conditions of {odd[0][1]}x{odd[0][0]} px: the sizes must be multiples of 8 (resize the split, e.g. "
            "with --resolution 512)."
        )


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Consecutive indices in batches of at most ``batch_size`` that share one size (a call has one size)."""
    batches: list[list[int]] = []
    for i, size in enumerate(sizes):
        if batches and len(batches[-1]) < batch_size and sizes[batches[-1][0]] == size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class MetricAccumulator:
    """Metric ``name`` accumulated over chunks of conditions, so a large split never holds all its images.

    :meth:`add` takes ``per_condition`` consecutive images for each of its conditions; :meth:`result` gives
    (mean, per-condition values or None: mIoU and FID are set-level)."""

    def __init__(
        self,
        name: str,
        models: EvalModels,
        per_condition: int,
        tolerance: float = 2.0,
        reference_features: np.ndarray | None = None,
    ) -> None:
        if name not in METRICS:
            raise ValueError(f"Unknown metric {name!r}; known: {', '.join(METRICS)}.")
        self.name, self.models, self.k, self.tolerance = name, models, per_condition, tolerance
        self.values: list[float] = []
        self.features: list[np.ndarray] = []
        self.reference_features = reference_features
        self.miou = None
        if name == "seg-miou":
            self.miou = M.MeanIoU(models.get("segmenter").num_classes, reduce_zero_label=True)

    def add(
        self,
        images: Sequence[np.ndarray],
        conditions: Sequence[np.ndarray],
        prompts: Sequence[str],
        labels: Sequence[np.ndarray] | None = None,
    ) -> None:
        from ..shapes.metrics import control_fidelity

        name, k = self.name, self.k
        groups = [images[i * k : (i + 1) * k] for i in range(len(conditions))]
        if name in ("edge-f1", "mask-iou"):
            kind = "edges" if name == "edge-f1" else "mask"
            tol = self.tolerance
            vals = [np.mean([control_fidelity(im, c, kind, tol) for im in g]) for g, c in zip(groups, conditions)]
        elif name == "canny-f1":
            vals = [100 * M.canny_f1(g, c) for g, c in zip(groups, conditions)]
        elif name == "hed-ms-ssim":
            hed = self.models.get("hed")
            vals = [np.mean([M.ms_ssim(hed(im), M.to_gray(c)) for im in g]) for g, c in zip(groups, conditions)]
        elif name == "depth-rmse":
            est = self.models.get("depth")
            vals = [np.mean([M.depth_rmse(est(im), c) for im in g]) for g, c in zip(groups, conditions)]
        elif name == "clip-score":
            model, processor = self.models.get("clip")
            vals = [M.clip_score(model, processor, list(g), [p] * len(g)) for g, p in zip(groups, prompts)]
        elif name == "seg-miou":
            seg = self.models.get("segmenter")
            for g, label in zip(groups, labels):
                for im in g:
                    self.miou.update(seg(im), label)
            return
        else:  # fid
            self.features.append(M.inception_features(self.models.get("inception"), list(images)))
            return
        self.values += [float(v) for v in vals]

    def result(self) -> tuple[float, list[float] | None]:
        if self.name == "seg-miou":
            return 100 * self.miou.value, None
        if self.name == "fid":
            return M.frechet_distance(np.concatenate(self.features), self.reference_features), None
        return float(np.mean(self.values)), list(self.values)


def skip_reason(name: str, models: EvalModels, has_images: bool, has_labels: bool, n_images: int) -> str | None:
    """Why metric ``name`` cannot run here, or None when it can."""
    metric = METRICS[name]
    if metric.model is not None and getattr(models, metric.model) is None:
        flag = {"segmenter": "--seg-model", "inception": "--inception"}.get(metric.model, f"--{metric.model}-model")
        return f"no {metric.model} model given ({flag})"
    if name == "fid" and not has_images:
        return "the split has no ground-truth images"
    if name == "fid" and n_images < 2:
        return "FID needs at least 2 images"
    if name == "seg-miou" and not has_labels:
        return "the split has no segmentation label column (seg_map / label, or --label-column)"
    return None


@dataclass
class MethodResult:
    """One method's scores: ``{metric: value}`` with and without control, per-condition values where defined."""

    method: str
    module: str
    with_control: dict[str, float]
    without_control: dict[str, float]
    per_condition: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        r4 = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
        return {
            "method": self.method,
            "module": self.module,
            "with_control": r4(self.with_control),
            "without_control": r4(self.without_control),
        }


def markdown_table(results: Sequence[MethodResult], metric_names: Sequence[str], skipped: dict[str, str]) -> str:
    """One row per method and control setting, one column per metric that ran; skipped metrics listed below."""
    ran = [m for m in metric_names if m not in skipped]
    arrows = [f"{METRICS[m].title} {'↑' if METRICS[m].higher_is_better else '↓'}" for m in ran]
    lines = ["| method | control | " + " | ".join(arrows) + " |", "|---|---|" + "---:|" * len(ran)]
    for r in results:
        for label, vals in (("with", r.with_control), ("without", r.without_control)):
            lines.append(f"| {r.method} | {label} | " + " | ".join(f"{vals[m]:.4g}" for m in ran) + " |")
    if skipped:
        lines.append("")
        lines += [f"- skipped {m}: {why}" for m, why in skipped.items()]
    return "\n".join(lines) + "\n"


def evaluate_methods(
    methods: Sequence[tuple[str, str, Callable[[], Any]]],
    prompts: Sequence[str],
    conditions: Sequence[np.ndarray],
    seeds: Sequence[int],
    condition: str,
    metric_names: Sequence[str],
    models: EvalModels,
    steps: int,
    guidance: float,
    scale: float = 1.0,
    images_per_condition: int = 1,
    references: Sequence[np.ndarray] | None = None,
    labels: Sequence[np.ndarray] | None = None,
    tolerance: float = 2.0,
    progress: bool = False,
    batch_size: int = 16,
) -> tuple[list[MethodResult], dict[str, str], dict[str, list]]:
    """Run the protocol for each ``(method, module label, pipeline factory)``; returns (results, skipped metrics,
    {method label: [with-control images, without-control images]}, the images of every condition, or of the first
    16 when there are over 1024 images). Images are generated and scored in chunks of ``batch_size``.

    Condition ``i`` gets ``images_per_condition`` images with seeds ``seeds[i] * images_per_condition + j``."""
    for m in metric_names:
        if m not in METRICS:
            raise ValueError(f"Unknown metric {m!r}; known: {', '.join(METRICS)}.")
        if METRICS[m].conditions is not None and condition not in METRICS[m].conditions:
            raise ValueError(
                f"Metric {m!r} does not apply to a {condition!r} condition; "
                f"for it: {', '.join(applicable_metrics(condition))}."
            )
    _check_sizes(conditions)  # before any model is loaded
    k = images_per_condition
    if k < 1:
        raise ValueError(f"images_per_condition must be at least 1, got {k}.")
    rep_prompts = [p for p in prompts for _ in range(k)]
    rep_conds = [c for c in conditions for _ in range(k)]
    rep_seeds = [int(s) * k + j for s in seeds for j in range(k)]
    skipped = {
        m: why
        for m in metric_names
        if (why := skip_reason(m, models, references is not None, labels is not None, len(rep_prompts))) is not None
    }
    reference_features = None
    if "fid" in metric_names and "fid" not in skipped:  # the split's own images: computed once for all methods
        reference_features = M.inception_features(models.get("inception"), list(references))
    chunk = max(1, batch_size // k)  # conditions per pipeline call
    kept = len(conditions) if len(conditions) * k <= 1024 else 16  # images kept for the caller's grid
    results, images = [], {}
    for method, module, make_pipe in methods:
        pipe = make_pipe()
        res = MethodResult(method, module, {}, {})
        shown: dict[float, list] = {}
        for s, target in ((scale, res.with_control), (0.0, res.without_control)):
            accs = [
                MetricAccumulator(m, models, k, tolerance, reference_features) for m in metric_names if m not in skipped
            ]
            shown[s] = []
            for c0 in range(0, len(conditions), chunk):
                cs = slice(c0, c0 + chunk)
                rs = slice(c0 * k, (c0 + chunk) * k)
                outs = generate(
                    method, pipe, rep_prompts[rs], rep_conds[rs], rep_seeds[rs], steps, guidance, s, batch_size,
                    progress,
                )
                for acc in accs:
                    acc.add(outs, conditions[cs], prompts[cs], None if labels is None else labels[cs])
                shown[s] += outs[: max(0, kept - c0) * k]
            for acc in accs:
                mean, per = acc.result()
                target[acc.name] = mean
                if per is not None:
                    res.per_condition.setdefault(acc.name, {})["with" if s == scale else "without"] = per
        del pipe
        results.append(res)
        images[f"{method}:{module}"] = [shown[scale], shown[0.0]]
    return results, skipped, images
