"""Pose tools: SimCC decoding, the DWPose post-processing chain, drawing and alignment (no ONNX files needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlnext.pose import (
    DWPOSE_FILES,
    DWPoseDetector,
    PoseAlignment,
    PoseFrame,
    decode_simcc,
    draw_pose,
    driving_poses,
    find_dwpose_files,
    fit_pose_alignment,
    wholebody_to_openpose,
)
from controlnext.pose.dwpose import yolox_decode
from controlnext.pose.simcc import bbox_to_center_scale, crop_transform, fix_aspect_ratio, keypoints_to_image

RNG = np.random.default_rng(0)


def _simcc_for(points: np.ndarray, input_size=(288, 384), ratio=2.0, peak=0.9):
    """Build SimCC outputs whose maxima sit at ``points`` (K, 2) (model-input pixels, multiples of 1/ratio)."""
    k = len(points)
    sx = RNG.uniform(0, 0.1, (1, k, int(input_size[0] * ratio))).astype(np.float32)
    sy = RNG.uniform(0, 0.1, (1, k, int(input_size[1] * ratio))).astype(np.float32)
    for i, (x, y) in enumerate(points):
        sx[0, i, int(round(x * ratio))] = peak
        sy[0, i, int(round(y * ratio))] = peak - 0.1
    return sx, sy


# ---------------------------------------------------------------------- SimCC and the crop transform
def test_decode_simcc_recovers_constructed_peaks():
    pts = np.array([[10.5, 20.0], [287.0, 0.0], [143.5, 383.5]])
    sx, sy = _simcc_for(pts)
    locs, scores = decode_simcc(sx, sy, split_ratio=2.0)
    assert locs.shape == (1, 3, 2) and scores.shape == (1, 3)
    np.testing.assert_allclose(locs[0], pts)
    np.testing.assert_allclose(scores[0], 0.8, rtol=1e-6)  # the smaller of the two maxima


def test_decode_simcc_marks_non_positive_scores_and_checks_shapes():
    sx = np.full((2, 4, 10), -1.0, dtype=np.float32)
    sy = np.full((2, 4, 12), -1.0, dtype=np.float32)
    sx[0, 0, 3], sy[0, 0, 5] = 0.5, 0.5
    locs, scores = decode_simcc(sx, sy, split_ratio=2.0)
    np.testing.assert_allclose(locs[0, 0], [1.5, 2.5])
    assert (locs[1] == -0.5).all() and (scores[1] <= 0).all()
    with pytest.raises(ValueError, match="same N and K"):
        decode_simcc(sx, sy[:, :3])


def test_crop_transform_and_its_inverse():
    center, scale = bbox_to_center_scale(np.array([100, 50, 300, 450]), padding=1.25)
    np.testing.assert_allclose(center, [200, 250])
    np.testing.assert_allclose(scale, [250, 500])
    scale = fix_aspect_ratio(scale, 288 / 384)
    np.testing.assert_allclose(scale[0] / scale[1], 0.75, rtol=1e-6)
    m = crop_transform(center, scale, (288, 384))
    img_pts = np.array([[200.0, 250.0], [120.0, 80.0], [333.0, 401.0]])
    crop_pts = img_pts @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(crop_pts[0], [144, 192])  # the box centre lands in the input's centre
    np.testing.assert_allclose(keypoints_to_image(crop_pts, center, scale, (288, 384)), img_pts, rtol=1e-5)


def test_wholebody_to_openpose_inserts_neck_and_reorders():
    kp = RNG.uniform(0, 100, (2, 133, 2)).astype(np.float32)
    sc = RNG.uniform(0.5, 1.0, (2, 133)).astype(np.float32)
    sc[1, 6] = 0.1  # person 1: right shoulder not visible -> neck score 0
    out, out_sc = wholebody_to_openpose(kp, sc)
    assert out.shape == (2, 134, 2) and out_sc.shape == (2, 134)
    np.testing.assert_allclose(out[:, 1], (kp[:, 5] + kp[:, 6]) / 2, rtol=1e-6)  # neck
    np.testing.assert_array_equal(out_sc[:, 1], [1.0, 0.0])
    # nose stays, COCO right shoulder (6) -> OpenPose 2, COCO left ear (3) -> OpenPose 17, left eye (1) -> 15
    for coco, op in [(0, 0), (6, 2), (5, 5), (3, 17), (1, 15), (16, 10), (11, 11)]:
        np.testing.assert_array_equal(out[:, op], kp[:, coco])
    np.testing.assert_array_equal(out[:, 18:], kp[:, 17:])  # feet, face, hands follow unchanged
    with pytest.raises(ValueError, match="133"):
        wholebody_to_openpose(kp[:, :100], sc[:, :100])


def test_yolox_decode_boxes_nms_and_threshold():
    size, ratio = (64, 64), 0.5  # the image was 128x128, letterboxed to 64
    anchors = (8 * 8) + (4 * 4) + (2 * 2)
    pred = np.zeros((1, anchors, 6), dtype=np.float32)
    pred[..., 4] = 0.0  # objectness 0: nothing by default
    # Anchor (gx=3, gy=2) at stride 8: centre ((3+0.5)*8, (2+0.25)*8) = (28, 18), size exp(log(4))*8 = 32.
    i = 2 * 8 + 3
    pred[0, i] = [0.5, 0.25, np.log(4), np.log(4), 0.9, 0.9]
    pred[0, i + 1] = [0.0, 0.25, np.log(4), np.log(4), 0.8, 0.9]  # heavy overlap with the first: suppressed
    pred[0, 64 + 5] = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]  # score 0.25: above the NMS floor, below 0.3
    boxes = yolox_decode(pred, size, ratio)
    np.testing.assert_allclose(boxes, [[(28 - 16) / ratio, (18 - 16) / ratio, (28 + 16) / ratio, (18 + 16) / ratio]])
    with pytest.raises(ValueError, match="anchors"):
        yolox_decode(pred[:, :10], size, ratio)


# ---------------------------------------------------------------------- the detector with stand-in sessions
class _FakeSession:
    def __init__(self, shape, outputs):
        self.shape, self.outputs, self.calls = shape, outputs, []

    def get_inputs(self):
        return [type("I", (), {"name": "input", "shape": self.shape})()]

    def run(self, names, feeds):
        self.calls.append(feeds["input"])
        return self.outputs(feeds["input"]) if callable(self.outputs) else self.outputs


def test_dwpose_detector_chain_on_constructed_outputs():
    """The whole post-processing chain: a person box in a 256x128 image -> crop -> SimCC -> normalised keypoints."""
    image = np.zeros((256, 128, 3), dtype=np.uint8)
    det = np.zeros((1, 80 * 80 + 40 * 40 + 20 * 20, 85), dtype=np.float32)  # 640x640 YOLOX layout
    # The letterbox ratio is 640/256 = 2.5. A person box (32, 64)-(96, 192) in the image is (80, 160)-(240, 480)
    # in the input: centre (160, 320), size 160x320 -> stride-32 anchor (gx=5, gy=10) with size exp(log(5))*32.
    i = 80 * 80 + 40 * 40 + 10 * 20 + 5
    det[0, i, :6] = [0.0, 0.0, np.log(5), np.log(10), 0.95, 0.95]
    # Keypoints constructed in the original image, then expressed in the pose model's input.
    box = np.array([32, 64, 96, 192], dtype=np.float32)
    center, scale = bbox_to_center_scale(box)
    scale = fix_aspect_ratio(scale, 288 / 384)
    m = crop_transform(center, scale, (288, 384))
    truth = np.stack([RNG.uniform(40, 90, 133), RNG.uniform(70, 180, 133)], axis=1)
    in_crop = np.round((truth @ m[:, :2].T + m[:, 2]) * 2) / 2  # SimCC bins are half pixels
    truth = keypoints_to_image(in_crop, center, scale, (288, 384))
    sx, sy = _simcc_for(in_crop)

    detector = DWPoseDetector.__new__(DWPoseDetector)
    detector.det_session = _FakeSession([1, 3, 640, 640], [det])
    detector.pose_session = _FakeSession([1, 3, 384, 288], [sx, sy])
    pose = detector(image)

    assert detector.det_session.calls[0].shape == (1, 3, 640, 640)
    assert detector.pose_session.calls[0].shape == (1, 3, 384, 288)
    assert pose.num_people == 1
    kp, _ = wholebody_to_openpose(truth[None], np.ones((1, 133)))
    np.testing.assert_allclose(pose.body[0], kp[0, :18] / [128, 256], atol=1e-5)
    np.testing.assert_allclose(pose.faces[0], kp[0, 24:92] / [128, 256], atol=1e-5)
    np.testing.assert_allclose(pose.hands[0], kp[0, 92:113] / [128, 256], atol=1e-5)  # left hand first
    np.testing.assert_allclose(pose.hands[1], kp[0, 113:] / [128, 256], atol=1e-5)
    with pytest.raises(ValueError, match="RGB uint8"):
        detector(image.astype(np.float32))


def test_missing_onnx_files_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTROLNEXT_DWPOSE_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="yolox_l.onnx and dw-ll_ucoco_384.onnx"):
        find_dwpose_files(None)
    (tmp_path / "yolox_l.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        DWPoseDetector(tmp_path)
    assert "dw-ll_ucoco_384.onnx" in str(err.value) and str(tmp_path) in str(err.value)
    assert "missing" in str(err.value) and "yolox_l.onnx (person detector)" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        DWPoseDetector(tmp_path / "yolox_l.onnx", tmp_path / "nope.onnx")
    (tmp_path / DWPOSE_FILES[1]).write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="Could not load the DWPose ONNX files"):
        DWPoseDetector(tmp_path)


# ---------------------------------------------------------------------- pose frames
def _person(center=(0.5, 0.5), height=0.6, score=0.9) -> tuple[np.ndarray, np.ndarray]:
    """A plausible upright body (18 OpenPose points) around ``center``, ``height`` tall (normalised)."""
    cx, cy = center
    h = height
    rel = {0: (0, -0.45), 1: (0, -0.33), 2: (-0.1, -0.33), 3: (-0.15, -0.15), 4: (-0.18, 0.0), 5: (0.1, -0.33),
           6: (0.15, -0.15), 7: (0.18, 0.0), 8: (-0.06, 0.02), 9: (-0.07, 0.25), 10: (-0.08, 0.48), 11: (0.06, 0.02),
           12: (0.07, 0.25), 13: (0.08, 0.48), 14: (-0.02, -0.47), 15: (0.02, -0.47), 16: (-0.04, -0.46),
           17: (0.04, -0.46)}  # fmt: skip
    body = np.array([[cx + dx * h, cy + dy * h] for _, (dx, dy) in sorted(rel.items())])
    return body, np.full(18, score)


def make_pose(people: list[tuple[np.ndarray, np.ndarray]], with_hands=True) -> PoseFrame:
    n = len(people)
    kp = np.zeros((n, 134, 2))
    sc = np.zeros((n, 134))
    for i, (body, score) in enumerate(people):
        kp[i, :18], sc[i, :18] = body, score
        if with_hands:
            for j, wrist in ((92, body[7]), (113, body[4])):
                kp[i, j : j + 21] = wrist + np.linspace(0, 0.05, 21)[:, None]
                sc[i, j : j + 21] = 0.9
        kp[i, 24:92] = body[0] + RNG.uniform(-0.02, 0.02, (68, 2))
        sc[i, 24:92] = 0.8
    return PoseFrame.from_wholebody(kp, sc)


def test_pose_frame_layout_transform_and_json():
    pose = make_pose([_person(), _person((0.3, 0.5))])
    assert pose.num_people == 2 and pose.hands.shape == (4, 21, 2) and pose.faces.shape == (2, 68, 2)
    moved = pose.transformed((2.0, 0.5), (0.1, -0.2))
    np.testing.assert_allclose(moved.body, pose.body * [2.0, 0.5] + [0.1, -0.2])
    np.testing.assert_allclose(moved.hands, pose.hands * [2.0, 0.5] + [0.1, -0.2])
    np.testing.assert_array_equal(moved.body_scores, pose.body_scores)
    again = PoseFrame.from_dict(json.loads(json.dumps(pose.to_dict())))
    np.testing.assert_array_equal(again.faces, pose.faces)
    body, hands, face = pose.to_pixels(200, 100)
    assert body.shape == (2, 18, 3) and hands.shape == (2, 2, 21, 3) and face.shape == (2, 68, 3)
    np.testing.assert_allclose(hands[1, 0, :, :2], pose.hands[1] * [200, 100])  # person 1's left hand
    np.testing.assert_allclose(hands[0, 1, :, :2], pose.hands[2] * [200, 100])  # person 0's right hand
    assert PoseFrame.empty().num_people == 0
    with pytest.raises(ValueError, match="134"):
        PoseFrame.from_wholebody(np.zeros((1, 18, 2)), np.zeros((1, 18)))


# ---------------------------------------------------------------------- drawing
def test_drawing_is_deterministic_and_puts_strokes_where_the_body_is():
    pose = make_pose([_person()])
    a = draw_pose(pose, 128, 96, supersample=256)
    b = draw_pose(pose, 128, 96, supersample=256)
    assert a.shape == (128, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    ys, xs = np.nonzero(a.any(-1))
    body = pose.body[0] * [96, 128]
    assert xs.min() >= body[:, 0].min() - 4 and xs.max() <= body[:, 0].max() + 8
    assert ys.min() >= body[:, 1].min() - 4 and ys.max() <= body[:, 1].max() + 4
    # Nothing visible -> black canvas; only the body -> fewer strokes than with hands and face.
    hidden = make_pose([(pose.body[0], np.zeros(18))], with_hands=False)
    hidden.face_scores[:] = 0
    assert draw_pose(hidden, 64, 64, supersample=None).max() == 0
    body_only = draw_pose(pose, 128, 96, supersample=256, hands=False, face=False)
    assert (body_only.any(-1)).sum() < (a.any(-1)).sum()


def test_drawing_colours_follow_the_release_palette():
    # One limb (neck -> right shoulder, limb 0) at full confidence, drawn without supersampling: the limb layer is
    # dimmed to 60 % and colours are written BGR and flipped at the end, so limb 0's (255, 0, 0) shows as blue.
    body = np.zeros((18, 2))
    score = np.zeros(18)
    body[1], body[2] = (0.2, 0.5), (0.8, 0.5)
    score[1] = score[2] = 1.0
    pose = PoseFrame.from_wholebody(np.pad(body, ((0, 116), (0, 0)))[None], np.pad(score, (0, 116))[None])
    img = draw_pose(pose, 100, 100, supersample=None, hands=False, face=False)
    np.testing.assert_array_equal(img[50, 50], [0, 0, 153])  # 0.6 x 255 in the blue channel
    np.testing.assert_array_equal(img[50, 20], [0, 85, 255])  # the neck joint's own colour (255, 85, 0), flipped
    assert img[30, 50].max() == 0


# ---------------------------------------------------------------------- alignment
def _driving_from_reference(ref_body, ax, ay, bx, by, n=6):
    """Driving frames whose aligned poses equal the reference body plus a little motion."""
    frames = []
    for i in range(n):
        moved = ref_body + RNG.normal(0, 0.01, ref_body.shape) * (i > 0)
        drv = np.stack([(moved[:, 0] - bx) / ax, (moved[:, 1] - by) / ay], axis=1)
        frames.append(make_pose([(drv, np.full(18, 0.9))]))
    return frames


@pytest.mark.parametrize("ref_size,video_size", [((1024, 576), (720, 1280)), ((512, 512), (512, 512))])
def test_alignment_recovers_a_known_scale_and_offset(ref_size, video_size):
    ref_body, _ = _person((0.5, 0.55), 0.7)
    reference = make_pose([_person((0.5, 0.55), 0.7)])
    ay, by = 0.8, 0.07
    (h, w), (fh, fw) = ref_size, video_size
    ax, bx = ay * (fw / fh) * (h / w), -0.12
    driving = [_driving_from_reference(ref_body, ax, ay, bx, by, n=1)[0]] * 3  # no motion: an exact fit
    fit = fit_pose_alignment(reference, driving, ref_size, video_size)
    np.testing.assert_allclose([fit.ax, fit.ay, fit.bx, fit.by], [ax, ay, bx, by], rtol=1e-9, atol=1e-12)
    aligned = fit.apply(driving[0])
    np.testing.assert_allclose(aligned.body[0], ref_body, atol=1e-12)
    np.testing.assert_allclose(aligned.hands, driving[0].hands * [ax, ay] + [bx, by])


def test_alignment_is_the_least_squares_fit_of_the_release():
    """With noisy motion, y is numpy.polyfit's line over the reference points; x follows from the aspect ratios."""
    ref_body, _ = _person((0.45, 0.5), 0.6)
    reference = make_pose([(ref_body, np.full(18, 0.9))])
    reference.body_scores[0, [3, 9]] = 0.1  # a point outside the used set and one inside it: not visible
    driving = _driving_from_reference(ref_body, 1.1, 0.9, 0.05, 0.02, n=8)
    driving.append(make_pose([_person(), _person((0.2, 0.5))]))  # two people: ignored
    fit = fit_pose_alignment(reference, driving, (768, 512), (480, 640))
    ids = [0, 1, 2, 5, 8, 10, 11, 12, 13, 14, 15, 16, 17]
    drv = np.stack([p.body[0, ids] for p in driving[:-1]])
    ay, by = np.polyfit(drv[..., 1].ravel(), np.tile(ref_body[ids, 1], len(drv)), 1)
    ax = ay / (480 / 640 / 768 * 512)
    bx = np.mean(np.tile(ref_body[ids, 0], len(drv)) - drv[..., 0].ravel() * ax)
    np.testing.assert_allclose([fit.ax, fit.ay, fit.bx, fit.by], [ax, ay, bx, by], rtol=1e-9)


def test_alignment_errors_are_clear():
    ref = make_pose([_person()])
    one = make_pose([_person()])
    with pytest.raises(ValueError, match="No person was detected in the reference"):
        fit_pose_alignment(PoseFrame.empty(), [one], (64, 64), (64, 64))
    hidden = make_pose([(_person()[0], np.zeros(18))])
    with pytest.raises(ValueError, match="reference image's head, shoulder, hip or leg"):
        fit_pose_alignment(hidden, [one], (64, 64), (64, 64))
    with pytest.raises(ValueError, match="exactly one person"):
        fit_pose_alignment(ref, [PoseFrame.empty(), make_pose([_person(), _person()])], (64, 64), (64, 64))


def test_driving_poses_detects_aligns_and_draws_with_the_reference_first():
    ref_body, _ = _person((0.5, 0.5), 0.6)
    truth = PoseAlignment(ax=0.9, ay=0.9, bx=0.04, by=0.03)
    drv_poses = _driving_from_reference(ref_body, truth.ax, truth.ay, truth.bx, truth.by, n=1) * 3
    reference_image = np.full((96, 96, 3), 7, dtype=np.uint8)
    frames = [np.full((96, 96, 3), i, dtype=np.uint8) for i in range(3)]
    lookup = {7: make_pose([(ref_body, np.full(18, 0.9))]), 0: drv_poses[0], 1: drv_poses[1], 2: drv_poses[2]}
    seen = []

    def detector(img):
        seen.append(int(img[0, 0, 0]))
        return lookup[int(img[0, 0, 0])]

    out = driving_poses(reference_image, iter(frames), detector, supersample=None, progress=False)
    assert seen == [7, 0, 1, 2] and len(out) == 4
    np.testing.assert_allclose([out.alignment.ax, out.alignment.ay], [truth.ax, truth.ay], rtol=1e-9)
    np.testing.assert_array_equal(out[0], draw_pose(lookup[7], 96, 96, supersample=None))
    np.testing.assert_array_equal(out[1], draw_pose(truth.apply(drv_poses[0]), 96, 96, supersample=None))
    plain = driving_poses(reference_image, frames, detector, align=False, include_reference=False, progress=False)
    assert len(plain) == 3 and plain.alignment is None
