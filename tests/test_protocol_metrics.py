"""The ControlNet++ protocol metrics (controlnext.evaluation.metrics) on hand-made cases with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from controlnext.evaluation import metrics as M
from controlnext.evaluation.models import HEDDetector, HEDNetwork, load_inception
from controlnext.shapes import render_sample


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def test_binary_f1_hand_made():
    target = np.zeros((8, 8), bool)
    target[2, :] = target[5, :] = True  # 16 edge pixels
    pred = np.zeros_like(target)
    pred[2, :] = True  # 8 of them: precision 1, recall 1/2
    pred[0, 0] = pred[0, 1] = True  # plus 2 false positives: precision 8/10
    # F1 = 2 TP / (|pred| + |target|) = 16 / 26
    assert M.binary_f1(pred, target) == pytest.approx(16 / 26)
    assert M.binary_f1(target, target) == 1.0
    assert M.binary_f1(np.zeros_like(target), target) == 0.0
    assert M.binary_f1(np.zeros_like(target), np.zeros_like(target)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        M.binary_f1(target, target[:4])


def test_canny_f1_identical_shifted_and_pooled():
    image = render_sample(5, 3).image
    edges = M.canny_map(image)
    assert edges.any()
    assert np.array_equal(edges, cv2.Canny(image, 100, 200) > 0)  # the protocol's thresholds on the RGB image
    condition = _rgb(edges.astype(np.uint8) * 255)
    assert M.canny_f1([image], condition) == 1.0
    shifted = np.roll(image, 3, axis=1)
    assert M.canny_f1([shifted], condition) < 0.5
    # Several images of one condition are pooled: F1 of the stacked maps, not the mean of per-image F1.
    pooled = M.binary_f1(np.stack([edges, M.canny_map(shifted)]), np.stack([edges, edges]))
    assert M.canny_f1([image, shifted], condition) == pytest.approx(pooled)


def _smooth(seed: int, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((size, size)) * 255).astype(np.uint8), (0, 0), 3)


def test_ms_ssim_identical_degraded_and_too_small():
    a = _smooth(0)
    assert M.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(1)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    scores = [M.ms_ssim(n, a) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2], scores  # more noise, lower score
    assert M.ms_ssim(np.roll(a, 6, axis=0), a) < scores[0]
    assert M.ms_ssim(_smooth(2), a) < scores[1]  # an unrelated map of the same statistics
    assert M.ms_ssim(a, _smooth(2)) == pytest.approx(M.ms_ssim(_smooth(2), a))  # symmetric
    with pytest.raises(ValueError, match="161 px"):
        M.ms_ssim(a[:64, :64], a[:64, :64])


def test_depth_rmse_hand_made():
    d = _smooth(3, 32)
    assert M.depth_rmse(d, d) == 0.0
    assert M.depth_rmse(np.clip(d.astype(int) + 10, 0, 255).astype(np.uint8), d) == pytest.approx(
        np.sqrt(np.mean((np.clip(d.astype(int) + 10, 0, 255) - d) ** 2))
    )
    a, b = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    b[0, :] = 40  # 4 of 16 pixels off by 40: RMSE = sqrt(4 * 1600 / 16) = 20
    assert M.depth_rmse(_rgb(a), b) == pytest.approx(20.0)


def test_mean_iou_hand_made():
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    miou = M.MeanIoU(3)
    miou.update(label, label)
    assert miou.value == 1.0
    pred = label.copy()
    pred[0, 2] = 0  # class 0: I=4, U=5; class 1: I=3, U=4; class 2: I=4, U=4
    miou = M.MeanIoU(3)
    miou.update(pred, label)
    assert miou.value == pytest.approx((4 / 5 + 3 / 4 + 1) / 3)
    # Accumulated over images (per-class sums), not averaged per image; absent classes do not count.
    miou = M.MeanIoU(5)
    miou.update(np.array([[0, 0]]), np.array([[0, 1]]))  # class 0: I=1, U=2; class 1: I=0, U=1
    miou.update(np.array([[1, 1]]), np.array([[1, 1]]))  # class 1: I=2, U=2
    assert miou.value == pytest.approx((1 / 2 + 2 / 3) / 2)
    # ADE20K labels: 0 is "other" (ignored), class k is stored as k + 1.
    ade = M.MeanIoU(3, reduce_zero_label=True)
    # Labels become [0, 1, ignored, 2]; predictions [0, 1, -, 1]: class 0 I=1 U=1, class 1 I=1 U=2, class 2 I=0 U=1.
    ade.update(np.array([[0, 1, 2, 1]]), np.array([[1, 2, 0, 3]]))
    assert ade.value == pytest.approx((1 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        M.MeanIoU(3).update(np.zeros((1, 1)), np.full((1, 1), 7))


def test_frechet_distance_against_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    # Same covariance, shifted mean: the trace term vanishes and FID = |shift|^2.
    assert M.frechet_distance(a + shift, a) == pytest.approx((shift**2).sum(), rel=1e-6)
    # Two centred Gaussians with covariances s1^2 I and s2^2 I: FID = D (s1 - s2)^2.
    b = rng.normal(size=(200000, 3))
    assert M.frechet_distance(2 * b, b) == pytest.approx(3 * (2 - 1) ** 2, rel=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(a[:1], a)


class _TinyInception(torch.nn.Module):
    """A random Inception-like extractor with the TorchScript inception-2015-12-05 calling convention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.nn.functional.interpolate(x.float() / 255.0, size=(32, 32), mode="bilinear")
        return torch.relu(self.conv(h)).amax(dim=(2, 3))


def test_fid_with_a_tiny_torchscript_extractor(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    torch.jit.script(_TinyInception()).save(str(path))
    extract = load_inception(path)
    images = [render_sample(7, i).image for i in range(24)]
    assert M.fid(extract, images, images) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    noisy = {s: [np.clip(im + rng.normal(0, s, im.shape), 0, 255).astype(np.uint8) for im in images] for s in (8, 64)}
    mild, strong = (M.fid(extract, noisy[s], images) for s in (8, 64))
    assert 0 < mild < strong, (mild, strong)  # more degraded, further away
    with pytest.raises(ValueError, match="TorchScript"):
        (tmp_path / "junk.pt").write_bytes(b"not a model")
        load_inception(tmp_path / "junk.pt")


def test_hed_detector_loads_controlnet_state_dict(tmp_path):
    torch.manual_seed(0)
    net = HEDNetwork()
    # ControlNetHED.pth's parameter names.
    names = set(net.state_dict())
    assert {"norm", "block1.convs.0.weight", "block1.projection.weight", "block5.convs.2.bias"} <= names
    assert len(names) == 1 + 2 * (2 + 2 + 3 + 3 + 3) + 2 * 5
    torch.save(net.state_dict(), tmp_path / "ControlNetHED.pth")
    hed = HEDDetector.from_file(tmp_path / "ControlNetHED.pth")
    image = render_sample(5, 0).image
    edge = hed(image)
    assert edge.shape == image.shape[:2] and edge.dtype == np.uint8
    # The reference formula: sigmoid of the mean of the five side outputs brought to the input size.
    with torch.no_grad():
        sides = net(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None])
    up = [torch.nn.functional.interpolate(s, size=image.shape[:2], mode="bilinear") for s in sides]
    expected = (torch.sigmoid(torch.stack(up).mean(0))[0, 0].double().numpy() * 255).clip(0, 255).astype(np.uint8)
    assert np.abs(edge.astype(int) - expected.astype(int)).max() <= 1
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="ControlNetHED"):
        HEDDetector.from_file(tmp_path / "other.pth")


def test_clip_score_matches_the_model_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from controlnext.testing import write_tiny_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path / "tok", ["red", "circle"])))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=tokenizer)
    images = [render_sample(5, i).image for i in range(3)]
    prompts = ["a red circle", "red", "circle"]
    score = M.clip_score(model, processor, images, prompts)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    cos = out.logits_per_image.diag() / model.logit_scale.detach().exp()
    assert score == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert 0.0 <= score <= 100.0
