"""`controlnext eval` on the protocol: three control methods in one table, MultiGen-20M-style splits, skipping."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext.cli import main
from controlnext.evaluation import metrics as M
from controlnext.evaluation.data import read_split
from controlnext.shapes import render_sample


@pytest.fixture(scope="module")
def three_methods(tiny_sd15_dir, tmp_path_factory):
    """A tiny ControlNeXt module, ControlNet and T2I-Adapter, all on the tiny SD1.5 base of ``tiny_sd15_dir``."""
    from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel

    from controlnext.loading import save_controlnext_file
    from controlnext.testing import tiny_controlnext

    root = tmp_path_factory.mktemp("methods")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet")
    cnext = save_controlnext_file(tiny_controlnext("sd15-training"), root / "controlnext.safetensors")
    controlnet = ControlNetModel.from_unet(unet)
    torch.manual_seed(0)
    for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(zero_conv.weight, std=0.5)  # untrained zero convolutions would add nothing
    controlnet.save_pretrained(root / "controlnet")
    # One adapter feature map per UNet down block: 32 channels at the latent's 8x8, then 64 at 4x4.
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(root / "t2i")
    return {"controlnext": cnext, "controlnet": root / "controlnet", "t2i-adapter": root / "t2i"}


def test_eval_three_methods_one_table(tiny_sd15_dir, three_methods, tmp_path, capsys):
    args = ["eval", "--base", str(tiny_sd15_dir), "--n", "2", "--steps", "2", "--protocol", "controlnet++"]
    for method, module in three_methods.items():
        args += ["--method", method, "--module", str(module)]
    assert main([*args, "--output", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    # --protocol sets what is not given: guidance 7.5 and 4 images per condition; --steps 2 wins over its 20.
    assert (res["steps"], res["guidance"], res["images_per_condition"]) == (2, 7.5, 4)
    assert [m["method"] for m in res["methods"]] == ["controlnext", "controlnet", "t2i-adapter"]
    for m in res["methods"]:
        for scores in (m["with_control"], m["without_control"]):
            assert set(scores) == {"edge-f1", "canny-f1"}
            assert 0 <= scores["edge-f1"] <= 1 and 0 <= scores["canny-f1"] <= 100
    # Without control every method is the same base model with the same seeds: the same scores; with control
    # each method changes the images (its condition input is wired in).
    without = [m["without_control"] for m in res["methods"]]
    assert without[0] == pytest.approx(without[1]) and without[0] == pytest.approx(without[2])
    assert all(m["with_control"] != m["without_control"] for m in res["methods"])
    assert res["skipped"] == {
        "clip-score": "no clip model given (--clip-model)",
        "fid": "no inception model given (--inception)",
    }
    table = (tmp_path / "eval_edges.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 6  # header, then with / without for each method
    assert "edge F1" in rows[0] and "Canny F1" in rows[0] and "CLIP" not in rows[0]
    assert "skipped fid" in table and table in out
    saved = json.loads((tmp_path / "eval_edges.json").read_text())
    assert len(saved["cases"]) == 2 and saved["methods"] == res["methods"]
    assert (tmp_path / "eval_edges.png").is_file()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_read_parquet_split_and_derived_canny(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [render_sample(3, i) for i in range(3)]
    table = pa.table(
        {
            "image": [{"bytes": _png(s.image), "path": None} for s in samples],
            "text": [s.caption for s in samples],
            "seg_map": [{"bytes": _png(s.mask), "path": None} for s in samples],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "validation-00000.parquet")
    split = read_split(tmp_path, n=2, condition_column="image")
    assert split.prompts == [s.caption for s in samples[:2]]
    assert np.array_equal(split.images[1], samples[1].image) and np.array_equal(split.labels[0], samples[0].mask)
    with pytest.raises(ValueError, match="no column 'control_depth'"):
        read_split(tmp_path, condition_column="control_depth")
    with pytest.raises(ValueError, match="metadata.jsonl"):
        read_split(tmp_path / "data" / "missing")
    # The condition derived from the ground-truth image is its Canny map, so ground truth scores F1 = 1.
    from controlnext.evaluation import EvalModels
    from controlnext.evaluation.protocol import derive_condition

    cond = derive_condition("canny", split.images[0], EvalModels())
    assert M.canny_f1([split.images[0]], cond) == 1.0


def test_eval_on_a_canny_parquet_split(tiny_sd15_dir, three_methods, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [render_sample(4, i) for i in range(2)]
    pq.write_table(
        pa.table({"image": [{"bytes": _png(s.image)} for s in samples], "text": [s.caption for s in samples]}),
        tmp_path / "split.parquet",
    )
    from diffusers import T2IAdapter

    # A grey-input adapter, as the published Canny adapters are: it gets one-channel conditions.
    T2IAdapter(in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(tmp_path / "g")
    args = ["eval", "--base", str(tiny_sd15_dir), "--module", str(three_methods["controlnet"]), "--method"]
    args += ["controlnet", "--method", "t2i-adapter", "--module", str(tmp_path / "g")]
    args += ["--method", "controlnext", "--module", str(three_methods["controlnext"])]
    args += ["--data", str(tmp_path / "split.parquet"), "--condition", "canny", "--steps", "1"]
    # In bfloat16: every method's control model is cast with its pipeline.
    assert main([*args, "--condition-column", "image", "--dtype", "bfloat16", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["condition"] == "canny" and "fidelity" not in res
    assert [set(m["with_control"]) for m in res["methods"]] == [{"canny-f1"}] * 3
    assert set(res["skipped"]) == {"clip-score", "fid"}
    # HED and depth conditions derived from the images need their model.
    assert main([*args[:-4], "--condition", "hed", "--condition-column", "image"]) == 2
    assert "needs --hed-model" in capsys.readouterr().err


def test_eval_protocol_errors(tiny_sd15_dir, three_methods, tmp_path, capsys):
    base = ["eval", "--base", str(tiny_sd15_dir)]
    assert main([*base, "--method", "controlnet", "--method", "t2i-adapter", "--module", "x"]) == 2
    assert "one method per module" in capsys.readouterr().err
    assert main([*base, "--module", str(three_methods["controlnext"]), "--metrics", "depth-rmse", "--n", "1"]) == 2
    assert "does not apply to a 'edges' condition" in capsys.readouterr().err
    assert main([*base, "--module", str(three_methods["controlnext"]), "--metrics", "psnr"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main([*base, "--method", "controlnet", "--module", str(tmp_path), "--n", "1", "--steps", "1"]) == 2
    assert "ControlNetModel folder" in capsys.readouterr().err
    assert main(["eval", "--condition", "depth"]) == 2
    assert "needs --data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """Tiny random local annotator models: HED state dict, DPT depth, SegFormer (150 ADE20K classes), CLIP,
    TorchScript Inception-like extractor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    from controlnext.evaluation.models import HEDNetwork
    from controlnext.testing import write_tiny_clip_tokenizer

    root = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    torch.save(HEDNetwork().state_dict(), root / "ControlNetHED.pth")
    dpt = DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )  # fmt: skip
    DPTForDepthEstimation(dpt).save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_pad=False).save_pretrained(
        root / "depth"
    )
    seg = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=150,
    )  # fmt: skip
    SegformerForSemanticSegmentation(seg).save_pretrained(root / "seg")
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "seg")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(root / "clip")))
    clip = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=tokenizer).save_pretrained(
        root / "clip"
    )
    from test_protocol_metrics import _TinyInception

    torch.jit.script(_TinyInception()).save(str(root / "inception.pt"))
    return root


def test_eval_every_protocol_metric_with_local_models(tiny_sd15_dir, three_methods, annotators, tmp_path, capsys):
    """Depth, segmentation and HED splits at 192 px (MS-SSIM needs >= 161 px), with every annotator given: each
    metric runs (none skipped), and the generated-vs-condition numbers lie in their ranges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from controlnext.evaluation.models import DepthEstimator

    size = 192
    samples = [render_sample(6, i, size=size) for i in range(2)]
    depth = DepthEstimator(annotators / "depth")
    columns = {
        "image": [{"bytes": _png(s.image)} for s in samples],
        "text": [s.caption for s in samples],
        "control_depth": [{"bytes": _png(depth(s.image))} for s in samples],
        # A seg condition is a colour map with its class-id map beside it (ADE20K ids: 1 background, 6 shape).
        "control_seg": [{"bytes": _png(s.image)} for s in samples],
        "seg_map": [{"bytes": _png((s.mask > 0).astype(np.uint8) * 5 + 1)} for s in samples],
    }
    pq.write_table(pa.table(columns), tmp_path / "split.parquet")
    common = ["eval", "--base", str(tiny_sd15_dir), "--module", str(three_methods["controlnext"]), "--steps", "1"]
    common += ["--data", str(tmp_path / "split.parquet"), "--clip-model", str(annotators / "clip")]
    common += ["--inception", str(annotators / "inception.pt"), "--json"]
    runs = {
        "depth": ["--depth-model", str(annotators / "depth"), "--condition-column", "control_depth"],
        "seg": ["--seg-model", str(annotators / "seg")],
        "hed": ["--hed-model", str(annotators / "ControlNetHED.pth"), "--condition-column", "image"],
    }
    expected = {"depth": "depth-rmse", "seg": "seg-miou", "hed": "hed-ms-ssim"}
    for kind, extra in runs.items():
        assert main([*common, "--condition", kind, *extra]) == 0, kind
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["skipped"] == {}, (kind, res["skipped"])
        for scores in (res["methods"][0]["with_control"], res["methods"][0]["without_control"]):
            assert set(scores) == {expected[kind], "clip-score", "fid"}, kind
            assert 0 <= scores["clip-score"] <= 100 and scores["fid"] >= 0
        value = res["methods"][0]["with_control"][expected[kind]]
        assert {"depth": 0 <= value <= 255, "seg": 0 <= value <= 100, "hed": -1 <= value <= 1}[kind], value


def test_split_resolution_and_size_batches(tmp_path):
    from controlnext.evaluation.protocol import _batches, generate

    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 50:] = 255  # right half white
    label = np.zeros((60, 100), np.uint8)
    label[:, 50:] = 7
    (tmp_path / "img").mkdir()
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    Image.fromarray(label).save(tmp_path / "img" / "l.png")
    row = {"file_name": "img/a.png", "conditioning_image_file_name": "img/a.png", "text": "t", "label": "img/l.png"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    split = read_split(tmp_path, resolution=32)
    # Shorter side 60 -> 32 (the long side 100 -> 53), then the centre 32 x 32: the white edge sits in the middle.
    assert split.images[0].shape == (32, 32, 3) and split.conditions[0].shape == (32, 32, 3)
    assert split.labels[0].shape == (32, 32) and set(np.unique(split.labels[0])) == {0, 7}  # ids kept (nearest)
    assert split.labels[0][0, 0] == 0 and split.labels[0][0, -1] == 7
    with pytest.raises(ValueError, match="multiple of 8"):
        read_split(tmp_path, resolution=30)
    # One pipeline call per run of equal sizes, at most batch_size long.
    sizes = [(64, 64)] * 3 + [(32, 64)] * 2 + [(64, 64)]
    assert _batches(sizes, 2) == [[0, 1], [2], [3, 4], [5]]
    with pytest.raises(ValueError, match="multiples of 8"):
        generate("controlnet", None, ["t"], [image], [0], 1, 1.0, 1.0)


def test_metrics_accumulate_over_chunks_as_over_the_whole_set():
    from controlnext.evaluation import EvalModels
    from controlnext.evaluation.protocol import MetricAccumulator

    samples = [render_sample(8, i) for i in range(4)]
    conds = [np.repeat((M.canny_map(s.image) * 255).astype(np.uint8)[..., None], 3, 2) for s in samples]
    images = [im for s in samples for im in (s.image, np.roll(s.image, 2, axis=0))]  # 2 images per condition
    whole, chunked = (MetricAccumulator("canny-f1", EvalModels(), per_condition=2) for _ in range(2))
    whole.add(images, conds, ["p"] * 4)
    chunked.add(images[:2], conds[:1], ["p"])
    chunked.add(images[2:], conds[1:], ["p"] * 3)
    assert chunked.result() == whole.result()
    mean, per = whole.result()
    expected = [100 * M.canny_f1(images[2 * i : 2 * i + 2], conds[i]) for i in range(4)]  # pooled per condition
    assert per == pytest.approx(expected) and mean == pytest.approx(np.mean(expected))
