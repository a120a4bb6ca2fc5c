"""DWPose whole-body pose estimation with onnxruntime, from model files the user already has.

Two ONNX models from the DWPose project are needed, both read from a local folder (nothing is downloaded):
``yolox_l.onnx`` (person detector) and ``dw-ll_ucoco_384.onnx`` (whole-body keypoints, SimCC head).
Pipeline per image: YOLOX letterbox -> person boxes (score > 0.3 after NMS) -> for each box an affine crop to the
pose model's input -> SimCC decoding -> keypoints in the image, re-ordered to the OpenPose layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .simcc import (
    bbox_to_center_scale,
    crop_transform,
    decode_simcc,
    fix_aspect_ratio,
    keypoints_to_image,
    wholebody_to_openpose,
)
from .types import PoseFrame

__all__ = ["DETECTOR_FILE", "DWPOSE_FILES", "POSE_FILE", "DWPoseDetector", "find_dwpose_files", "yolox_decode"]

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DWPOSE_FILES = (DETECTOR_FILE, POSE_FILE)
# Environment variable naming a folder that holds both files.
DWPOSE_DIR_ENV = "CONTROLNEXT_DWPOSE_DIR"

_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def find_dwpose_files(model_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Locate ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` in ``model_dir`` (or ``$CONTROLNEXT_DWPOSE_DIR``).

    Raises ``FileNotFoundError`` naming the missing files and the folder searched.
    """
    folder = model_dir if model_dir is not None else os.environ.get(DWPOSE_DIR_ENV)
    if folder is None:
        raise FileNotFoundError(
            f"DWPose needs the ONNX files {DETECTOR_FILE} and {POSE_FILE}; pass the folder that holds them "
            f"(--dwpose-dir, or the {DWPOSE_DIR_ENV} environment variable). They come from the DWPose project "
            "(e.g. the Hugging Face repo yzd-v/DWPose) and are not downloaded automatically."
        )
    folder = Path(folder)
    missing = [name for name in DWPOSE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"DWPose model file(s) missing in {folder}: {', '.join(missing)}. Expected both {DETECTOR_FILE} "
            f"(person detector) and {POSE_FILE} (whole-body pose) there; get them from the DWPose project "
            "(e.g. the Hugging Face repo yzd-v/DWPose). Nothing is downloaded at run time."
        )
    return folder / DETECTOR_FILE, folder / POSE_FILE


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression (inclusive pixel areas, as YOLOX's reference post-processing)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= threshold]
    return keep


def yolox_decode(
    predictions: np.ndarray,
    input_size: tuple[int, int],
    ratio: float,
    *,
    nms_threshold: float = 0.45,
    candidate_threshold: float = 0.1,
    score_threshold: float = 0.3,
) -> np.ndarray:
    """Person boxes (M, 4) in image pixels from raw YOLOX outputs (1, A, 5 + classes) on a letterboxed input.

    Anchors are laid out stride by stride (8, 16, 32), row-major; box centres and sizes are decoded from grid
    offsets and log sizes, scored by objectness x class score, kept by NMS among person candidates above
    ``candidate_threshold``, and returned when their score exceeds ``score_threshold``.
    """
    pred = np.asarray(predictions, dtype=np.float32).reshape(-1, predictions.shape[-1]).copy()
    h, w = input_size
    grids, strides = [], []
    for stride in (8, 16, 32):
        gh, gw = h // stride, w // stride
        yv, xv = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xv, yv], axis=-1).reshape(-1, 2))
        strides.append(np.full((gh * gw, 1), stride))
    grid = np.concatenate(grids).astype(np.float32)
    stride = np.concatenate(strides).astype(np.float32)
    if len(grid) != len(pred):
        raise ValueError(
            f"The detector returned {len(pred)} anchors but a {w}x{h} input at strides 8/16/32 has {len(grid)}."
        )
    centers = (pred[:, :2] + grid) * stride
    sizes = np.exp(pred[:, 2:4]) * stride
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1) / ratio
    person = pred[:, 4] * pred[:, 5]
    valid = person > candidate_threshold
    if not valid.any():
        return np.zeros((0, 4), dtype=np.float32)
    boxes, person = boxes[valid], person[valid]
    keep = _nms(boxes, person, nms_threshold)
    boxes, person = boxes[keep], person[keep]
    return boxes[person > score_threshold]


class DWPoseDetector:
    """Whole-body pose estimation: ``detector(image_rgb_uint8) -> PoseFrame`` (coordinates in [0, 1]).

    Args:
        model_dir: folder holding ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` (default: ``$CONTROLNEXT_DWPOSE_DIR``),
            or the detector file itself when ``pose_path`` is given.
        pose_path: the whole-body pose model file, when the two files are given one by one.
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        pose_path: str | os.PathLike | None = None,
        providers: list[str] | None = None,
    ):
        if pose_path is None:
            det_path, pose_path = find_dwpose_files(model_dir)
        else:
            det_path, pose_path = Path(model_dir or ""), Path(pose_path)
            missing = [str(p) for p in (det_path, pose_path) if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"DWPose model file(s) not found: {', '.join(missing)}. Expected {DETECTOR_FILE} (person "
                    f"detector) and {POSE_FILE} (whole-body pose) from the DWPose project; nothing is downloaded."
                )
        import onnxruntime as ort

        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.det_session = ort.InferenceSession(str(det_path), providers=providers)
            self.pose_session = ort.InferenceSession(str(pose_path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            raise ValueError(f"Could not load the DWPose ONNX files in {det_path.parent}: {err}") from err

    @staticmethod
    def _input_hw(session) -> tuple[int, int]:
        shape = session.get_inputs()[0].shape
        return int(shape[2]), int(shape[3])

    def detect_people(self, image: np.ndarray) -> np.ndarray:
        """Person boxes (M, 4) as (x1, y1, x2, y2) image pixels."""
        h, w = self._input_hw(self.det_session)
        ratio = min(h / image.shape[0], w / image.shape[1])
        resized = cv2.resize(
            image, (int(image.shape[1] * ratio), int(image.shape[0] * ratio)), interpolation=cv2.INTER_LINEAR
        )
        padded = np.full((h, w, 3), 114, dtype=np.uint8)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        inp = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32)
        out = self.det_session.run(None, {self.det_session.get_inputs()[0].name: inp})[0]
        return yolox_decode(out, (h, w), ratio)

    def estimate(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """COCO-WholeBody keypoints (M, 133, 2) in image pixels and scores (M, 133) for each box.

        With no box, the whole image is used as one box (as the reference implementation does).
        """
        h, w = self._input_hw(self.pose_session)
        if len(boxes) == 0:
            boxes = np.array([[0, 0, image.shape[1], image.shape[0]]], dtype=np.float32)
        all_kp, all_sc = [], []
        for box in boxes:
            center, scale = bbox_to_center_scale(box, padding=1.25)
            scale = fix_aspect_ratio(scale, w / h)
            crop = cv2.warpAffine(image, crop_transform(center, scale, (w, h)), (w, h), flags=cv2.INTER_LINEAR)
            inp = ((crop.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1)[None]
            simcc_x, simcc_y = self.pose_session.run(None, {self.pose_session.get_inputs()[0].name: inp})[:2]
            # split ratio = SimCC bins per input pixel, read off the output width.
            locs, scores = decode_simcc(simcc_x, simcc_y, split_ratio=simcc_x.shape[-1] / w)
            all_kp.append(keypoints_to_image(locs[0], center, scale, (w, h)))
            all_sc.append(scores[0])
        return np.stack(all_kp), np.stack(all_sc)

    def __call__(self, image: np.ndarray) -> PoseFrame:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"DWPose expects an RGB uint8 image (H, W, 3); got {image.dtype} {image.shape}.")
        keypoints, scores = self.estimate(image, self.detect_people(image))
        keypoints, scores = wholebody_to_openpose(keypoints, scores)
        keypoints = keypoints / np.array([image.shape[1], image.shape[0]], dtype=np.float32)
        return PoseFrame.from_wholebody(keypoints, scores)
