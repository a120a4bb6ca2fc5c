"""The annotator models the protocol runs on generated images, each loaded from a local path (nothing is downloaded).

- HED soft edges: ControlNet 1.1's Apache-2.0 HED network (``ControlNetHED.pth`` of lllyasviel/Annotators).
- Depth: any transformers depth-estimation folder (DPT-Hybrid MiDaS is what MultiGen-20M's conditions came from),
  through :func:`controlnext.preprocess.depth`.
- Segmentation: a transformers semantic (or universal, e.g. Mask2Former) segmentation folder trained on ADE20K.
- CLIP: a transformers ``CLIPModel`` folder (the protocol uses openai/clip-vit-base-patch16).
- Inception: a TorchScript feature extractor called as ``model(uint8 images, return_features=True)``, such as the
  ``inception-2015-12-05.pt`` that StyleGAN3 and clean-fid use (2048 pool features).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

__all__ = ["HEDNetwork", "HEDDetector", "DepthEstimator", "Segmenter", "load_clip", "load_inception"]


def _require(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found at {p} (a local path is expected; nothing is downloaded).")
    return p


class _HEDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.max_pool2d(x, 2, 2) if down else x
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """ControlNet 1.1's HED: five VGG-style blocks, each with a 1x1 side projection; input RGB 0..255 float.

    The parameter names match ``ControlNetHED.pth`` so its state dict loads as is."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        specs = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
        for i, (cin, cout, layers) in enumerate(specs, 1):
            self.add_module(f"block{i}", _HEDBlock(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, sides = x - self.norm, []
        for i in range(1, 6):
            h, side = getattr(self, f"block{i}")(h, down=i > 1)
            sides.append(side)
        return sides


class HEDDetector:
    """Soft-edge map (H, W) uint8 of an RGB image: the sigmoid of the mean of the five side outputs, each brought
    back to the input size (bilinear), as ControlNet's annotator computes it."""

    def __init__(self, network: HEDNetwork, device: str | torch.device = "cpu") -> None:
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> HEDDetector:
        net = HEDNetwork()
        state = torch.load(_require(path, "HED weights (ControlNetHED.pth)"), map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} is not ControlNet's HED state dict (ControlNetHED.pth): {e}") from None
        return cls(net, device)

    @torch.no_grad()
    def __call__(self, image) -> np.ndarray:
        arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        h, w = arr.shape[:2]
        x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None].to(self.device)
        sides = [s[0, 0].float().cpu().numpy() for s in self.network(x)]
        sides = [cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR) for s in sides]
        edge = 1 / (1 + np.exp(-np.mean(sides, axis=0).astype(np.float64)))
        return (edge * 255.0).clip(0, 255).astype(np.uint8)


class DepthEstimator:
    """0..255 grey depth map (H, W) of an image, from a local transformers depth-estimation folder: the
    prediction brought to the image's size (bicubic) and min-max normalised, as :func:`controlnext.preprocess.depth`
    makes depth conditions (here on ``device``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import pipeline

        from ..preprocess import check_depth_model

        self.estimator = pipeline("depth-estimation", model=check_depth_model(path), device=torch.device(device))

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        from ..preprocess._image import _minmax_u8

        pil = image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(np.asarray(image))
        values = self.estimator(pil)["predicted_depth"].squeeze().float().cpu().numpy()
        if values.shape != (pil.height, pil.width):
            values = cv2.resize(values, pil.size, interpolation=cv2.INTER_CUBIC)
        return _minmax_u8(values.astype(np.float64))


class Segmenter:
    """Per-pixel class ids (H, W) of an image, from a local transformers segmentation folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation

        path = _require(path, "segmentation model folder")
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        try:
            self.model = AutoModelForSemanticSegmentation.from_pretrained(str(path)).eval()
        except ValueError:  # Mask2Former / OneFormer are "universal" segmentation models
            self.model = AutoModelForUniversalSegmentation.from_pretrained(str(path)).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.num_classes = len(self.model.config.id2label)

    @torch.no_grad()
    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        pil = image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(np.asarray(image))
        out = self.model(**self.processor(images=pil, return_tensors="pt").to(self.device))
        size = [(pil.height, pil.width)]
        if hasattr(self.processor, "post_process_semantic_segmentation"):
            return self.processor.post_process_semantic_segmentation(out, target_sizes=size)[0].cpu().numpy()
        logits = nn.functional.interpolate(out.logits, size=size[0], mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].cpu().numpy()


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    path = _require(path, "CLIP model folder")
    return CLIPModel.from_pretrained(str(path)).eval().to(device), CLIPProcessor.from_pretrained(str(path))


def load_inception(path: str | Path, device: str | torch.device = "cpu"):
    """A callable uint8 (B, 3, H, W) -> (B, D) features from a TorchScript Inception file."""
    try:
        model = torch.jit.load(str(_require(path, "Inception TorchScript file")), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(
            f"{path} is not a TorchScript file (expected e.g. inception-2015-12-05.pt of StyleGAN3 / clean-fid): {e}"
        ) from None

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device), return_features=True)

    return extract
