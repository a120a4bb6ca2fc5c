"""The ControlNet++ control-fidelity metrics (arXiv 2404.07987, section 4 and its evaluation scripts), as functions.

Each compares a map extracted from a generated image with the condition it was generated from:

- :func:`canny_f1`: pixel-exact F1 of two binary edge maps (the protocol's ``BinaryF1Score`` on Canny maps made
  with :func:`canny_map`, thresholds 100 / 200). Reported x100 in the paper's tables.
- :func:`ms_ssim`: multi-scale SSIM (Wang, Simoncelli, Bovik 2003) of two soft-edge (HED) maps in [0, 1], with
  the protocol's implementation (torchmetrics, 5 scales, 11 px Gaussian window, sigma 1.5).
- :func:`depth_rmse`: root mean squared error of two 0..255 grey depth maps.
- :class:`MeanIoU`: segmentation mIoU accumulated over a data set the way mmsegmentation does (per-class
  intersections and unions summed over all images, then averaged over the classes that occur).
- :func:`clip_score`: torchmetrics' CLIPScore formula, ``100 * max(cos(image, text), 0)``.
- :func:`frechet_distance` / :func:`fid`: Frechet distance between Gaussian fits of two feature sets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "CANNY_THRESHOLDS",
    "MeanIoU",
    "binary_f1",
    "canny_f1",
    "canny_map",
    "clip_score",
    "depth_rmse",
    "fid",
    "frechet_distance",
    "ms_ssim",
    "to_gray",
]

CANNY_THRESHOLDS = (100, 200)  # the protocol's low / high Canny thresholds
MS_SSIM_MIN_SIDE = (11 - 1) * 2**4 + 1  # 11 px window at the coarsest of 5 scales (factor 2**4)


def to_gray(image) -> np.ndarray:
    """(H, W) uint8 from a PIL image or an (H, W[, C]) uint8 array (RGB is averaged as PIL's ``convert('L')``)."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("L"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got dtype {arr.dtype}.")
    if arr.ndim == 3:
        if arr.shape[-1] == 1:
            return arr[..., 0]
        return cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2:
        raise ValueError(f"Expected an (H, W) or (H, W, C) image, got shape {arr.shape}.")
    return arr


def canny_map(image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Bool (H, W) Canny edges of an RGB uint8 image, as ControlNet's Canny annotator makes them (``cv2.Canny`` on
    the RGB image: OpenCV takes the strongest gradient over the channels)."""
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"Expected an (H, W[, 3]) uint8 image, got {arr.dtype} of shape {arr.shape}.")
    return cv2.Canny(np.ascontiguousarray(arr), low, high) > 0


def binary_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Pixel-exact F1 of two bool maps of one shape (or stacks of them, pooled); 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"Edge map shapes differ: {pred.shape} vs {target.shape}.")
    tp = int(np.logical_and(pred, target).sum())
    denominator = int(pred.sum()) + int(target.sum())
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def canny_f1(images: Sequence, condition) -> float:
    """F1 of the Canny maps (100 / 200) of ``images`` against one Canny ``condition`` (white edges on black, > 127
    is an edge). Several images of one condition are pooled into one F1, as the protocol's script does."""
    target = to_gray(condition) > 127
    preds = [canny_map(im) for im in images]
    for p in preds:
        if p.shape != target.shape:
            raise ValueError(f"Image size {p.shape} differs from the condition's {target.shape}.")
    return binary_f1(np.stack(preds), np.stack([target] * len(preds)))


def ms_ssim(pred, target) -> float:
    """MS-SSIM of two grey maps (uint8 (H, W) arrays or (B, 1, H, W) tensors in [0, 1]); 1.0 for identical maps.

    torchmetrics' implementation with its defaults (the ones the protocol's script uses); the shorter side must be
    at least 161 px so that the 11 px window fits at the coarsest of the five scales.
    """
    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MS-SSIM needs torchmetrics: pip install 'controlnext[eval]'.") from e
    a, b = _as_batch(pred), _as_batch(target)
    if a.shape != b.shape:
        raise ValueError(f"Map shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    if min(a.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"MS-SSIM needs maps of at least {MS_SSIM_MIN_SIDE} px on the shorter side, got {tuple(a.shape[-2:])}."
        )
    return float(multiscale_structural_similarity_index_measure(a, b, data_range=1.0))


def _as_batch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.float()
    else:
        t = torch.from_numpy(to_gray(x).astype(np.float32) / 255.0)
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t.double()


def depth_rmse(pred, target) -> float:
    """RMSE between two grey depth maps on the 0..255 scale (PIL images or uint8 arrays); 0 when identical."""
    a, b = to_gray(pred).astype(np.float64), to_gray(target).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Depth map shapes differ: {a.shape} vs {b.shape}.")
    return float(np.sqrt(np.mean((a - b) ** 2)))


class MeanIoU:
    """Segmentation mIoU over a data set: per-class intersections and unions are summed over every
    :meth:`update`, and :attr:`value` averages IoU over the classes present in either prediction or label.

    Labels equal to ``ignore_index`` are left out. With ``reduce_zero_label`` (ADE20K's convention: 0 is "other",
    class ``k`` is stored as ``k + 1``) labels are shifted down by one and 0 becomes ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.intersection = np.zeros(num_classes, np.int64)
        self.union = np.zeros(num_classes, np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"Prediction {pred.shape} and label {label.shape} differ in shape.")
        if self.reduce_zero_label:
            label = np.where(label == 0, self.ignore_index, label - 1)
            label = np.where(label == self.ignore_index - 1, self.ignore_index, label)
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"Predicted classes must lie in 0..{self.num_classes - 1}.")
        if label.size and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(
                f"Label classes must lie in 0..{self.num_classes - 1} (or be {self.ignore_index}); got "
                f"{label.min()}..{label.max()}: is reduce_zero_label right for these labels?"
            )
        n = self.num_classes
        hit = np.bincount(pred[pred == label], minlength=n)
        self.intersection += hit
        self.union += np.bincount(pred, minlength=n) + np.bincount(label, minlength=n) - hit

    @property
    def value(self) -> float:
        present = self.union > 0
        if not present.any():
            return float("nan")
        return float(np.mean(self.intersection[present] / self.union[present]))


@torch.no_grad()
def clip_score(model, processor, images: Sequence, prompts: Sequence[str]) -> float:
    """Mean CLIP score ``100 * max(cos(image embedding, text embedding), 0)`` of ``images[i]`` with ``prompts[i]``
    (a transformers ``CLIPModel`` and its ``CLIPProcessor``)."""
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts.")
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True)
    inputs = inputs.to(model.device)
    img = model.get_image_features(pixel_values=inputs["pixel_values"])
    txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 may wrap the features
    cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two (N, D) feature sets:
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))`` (Heusel et al. 2017)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected two (N, D) feature sets with the same D, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images in each set.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a singular product (few images) is handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference implementation does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


@torch.no_grad()
def inception_features(extractor, images: Sequence, batch_size: int = 32) -> np.ndarray:
    """(N, D) features of uint8 RGB images from an Inception-like ``extractor`` that takes a uint8 (B, 3, H, W)
    tensor (0..255, any size: it resizes itself, as the TorchScript ``inception-2015-12-05.pt`` does)."""
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        batch = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in chunk])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        out.append(extractor(x).float().reshape(len(batch), -1).cpu().numpy())
    return np.concatenate(out)


def fid(extractor, images: Sequence, reference: Sequence) -> float:
    """FID of ``images`` against ``reference`` images with the given Inception-like feature extractor."""
    return frechet_distance(inception_features(extractor, images), inception_features(extractor, reference))
