"""Every published variant is a config of ControlNeXtModel with the published key names, shapes and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from controlnext import VARIANTS, ControlNeXtModel

# A copy of shared/spec/published-keys: the key lists of the published checkpoints.
SPEC = Path(__file__).parent / "data" / "published-keys"
PARAMS = {"sd15": 5_352_327, "sd15-training": 3_526_400, "sdxl": 3_526_400, "svd": 5_610_177, "svd-v2": 3_526_400}
TENSORS = {"sd15": 51, "sd15-training": 52, "sdxl": 52, "svd": 65, "svd-v2": 52}
OUT = {"sd15": 1280, "sd15-training": 320, "sdxl": 320, "svd": 1280, "svd-v2": 320}


def spec_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    path = SPEC / f"{variant}.tsv"
    if not path.is_file():
        pytest.skip(f"spec file {path} not present beside the checkout")
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keys_and_shapes_match_published(variant):
    with torch.device("meta"):
        model = ControlNeXtModel.from_variant(variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec_shapes(variant)
    assert len(ours) == TENSORS[variant]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[variant]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_shape_and_video_handling(variant):
    torch.manual_seed(0)
    model = ControlNeXtModel.from_variant(variant).eval()
    with torch.no_grad():
        if variant.startswith("svd"):
            video = torch.rand(2, 3, 3, 64, 64)
            out = model(video, torch.tensor([10, 500])).sample
            assert out.shape[:2] == (6, OUT[variant])
            # Frames are independent images with their video's timestep (repeat_interleave over frames).
            frame = model(video[1, 2:3], 500).sample
            torch.testing.assert_close(out[5:6], frame, rtol=1e-4, atol=1e-5)
        else:
            out = model(torch.rand(2, 3, 64, 64), 10).sample
            assert out.shape == (2, OUT[variant], 8, 8)


def test_effective_scale_rules():
    sd15 = ControlNeXtModel.from_variant("sd15")
    assert float(sd15.effective_scale().detach()) == 1.0  # learned scalar, initialised to 1
    svd = ControlNeXtModel.from_variant("svd")
    assert float(svd.effective_scale().detach()) == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item() * 1.3)
    assert float(ControlNeXtModel.from_variant("svd-v2").effective_scale()) == pytest.approx(0.2)
    assert float(ControlNeXtModel.from_variant("sdxl", controlnext_scale=0.5).effective_scale()) == 0.5


def test_config_round_trip(tmp_path):
    model = ControlNeXtModel.from_variant("svd-v2")
    model.save_pretrained(tmp_path)
    again = ControlNeXtModel.from_pretrained(tmp_path)
    assert again.config.injection_point == "after_down_block_0"
    assert again.config.uncond_control is False
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="injection_point"):
        ControlNeXtModel.from_variant("sdxl", injection_point="somewhere")
    with pytest.raises(ValueError, match="Unknown ControlNeXt variant"):
        ControlNeXtModel.from_variant("sd4")
    with pytest.raises(ValueError, match="channels"):
        ControlNeXtModel.from_variant("sdxl")(torch.rand(1, 4, 64, 64), 1)
