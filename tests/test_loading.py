"""Single-file loading of published-layout files, UNet subsets/deltas, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from controlnext import ControlNeXtModel
from controlnext.loading import (
    load_controlnext,
    load_controlnext_file,
    load_unet_weights,
    match_variants,
    read_state_dict,
    save_controlnext_file,
    save_unet_weights,
    select_parameters,
)
from controlnext.testing.models import tiny_controlnext, tiny_unet


class Payload:
    """A non-tensor object: loading it needs full unpickling."""


def published_file(tmp_path, variant, suffix):
    """A file laid out like the release: a plain tensor dict, no metadata."""
    torch.manual_seed(3)
    model = ControlNeXtModel.from_variant(variant)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"controlnet{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, model


@pytest.mark.parametrize(
    "variant,suffix,family",
    [
        ("sd15", ".bin", None),
        ("svd", ".bin", None),
        ("sdxl", ".safetensors", None),
        ("svd-v2", ".bin", "svd"),
        ("sd15-training", ".bin", "sd15"),
    ],
)
def test_published_layout_loads_strictly_and_is_detected(tmp_path, variant, suffix, family):
    path, model = published_file(tmp_path, variant, suffix)
    loaded = ControlNeXtModel.from_single_file(path, family=family)
    assert loaded.config.variant == variant
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cond = torch.rand(1, 2, 3, 64, 64) if variant.startswith("svd") else torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(cond, 5).sample, model.eval()(cond, 5).sample)


def test_light_layout_is_ambiguous_without_a_hint(tmp_path):
    path, _ = published_file(tmp_path, "svd-v2", ".bin")
    assert set(match_variants(read_state_dict(path)[0])) == {"sd15-training", "sdxl", "svd-v2"}
    with pytest.raises(ValueError, match="variant="):
        load_controlnext_file(path)
    assert load_controlnext_file(path, variant="svd-v2").config.injection_point == "after_down_block_0"
    with pytest.raises(ValueError, match=r"for sdxl UNets\) but the UNet is sd15"):
        load_controlnext_file(path, variant="sdxl", family="sd15")


def test_own_single_file_round_trip_keeps_config(tmp_path):
    module = tiny_controlnext("sd15-training")
    path = save_controlnext_file(module, tmp_path / "module.safetensors")
    again = load_controlnext(path)

    def public(cfg):
        return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))

    assert public(again.config) == public(module.config)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))
    assert set(read_state_dict(path)[0]) == set(module.state_dict())  # published key layout, nothing extra


def test_folder_and_missing_paths(tmp_path):
    module = tiny_controlnext("sdxl")
    module.save_pretrained(tmp_path / "folder")
    assert load_controlnext(tmp_path / "folder").config.variant == "sdxl"
    with pytest.raises(FileNotFoundError):
        load_controlnext(tmp_path / "nope" / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_mismatched_keys_name_the_closest_variant(tmp_path):
    state = ControlNeXtModel.from_variant("sdxl").state_dict()
    state.pop("mid_convs.1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["embedding.0.weight"] = torch.zeros(64, 4, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError) as err:
        load_controlnext_file(path)
    msg = str(err.value)
    assert "closest published variant" in msg and "mid_convs.1.weight" in msg and "extra.weight" in msg
    assert "embedding.0.weight" in msg


def test_corrupt_and_pickled_files(tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_state_dict(bad)
    truncated = tmp_path / "trunc.bin"
    torch.save({"a": torch.zeros(10)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:20])
    with pytest.raises(ValueError, match="not a readable torch file"):
        read_state_dict(truncated)

    evil = tmp_path / "evil.bin"
    torch.save({"a": torch.zeros(1), "obj": Payload()}, evil)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_state_dict(evil)
    with pytest.raises(ValueError, match="Unsupported"):
        (tmp_path / "x.txt").write_text("x")
        read_state_dict(tmp_path / "x.txt")


@pytest.mark.parametrize("as_deltas", [False, True])
def test_unet_subset_values_and_deltas(tmp_path, as_deltas):
    base = tiny_unet("sd15")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    trained = tiny_unet("sd15")
    names = select_parameters(trained, ["to_out"])
    assert names and all("to_out" in n for n in names)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n in names:
                p.add_(torch.randn_like(p))
    path = save_unet_weights(trained, tmp_path / "unet.safetensors", names, base_state if as_deltas else None)
    mode, keys = load_unet_weights(base, path)
    assert mode == ("deltas" if as_deltas else "values") and keys == sorted(names)
    for (n, a), (_, b) in zip(base.state_dict().items(), trained.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if as_deltas else 0, msg=n)


def test_published_delta_file_name_and_prefixed_keys(tmp_path):
    unet = tiny_unet("sdxl")
    name = next(n for n, _ in unet.named_parameters() if "attn2" in n and "to_out" in n)
    before = dict(unet.named_parameters())[name].detach().clone()
    path = tmp_path / "unet_weight_increasements.safetensors"
    save_file({f"unet.{name}": torch.ones_like(before)}, str(path))
    mode, _ = load_unet_weights(unet, path)
    assert mode == "deltas"
    torch.testing.assert_close(dict(unet.named_parameters())[name].detach(), before + 1)


def test_unet_weights_for_another_unet_are_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"down_blocks.9.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="another base model family"):
        load_unet_weights(tiny_unet("sd15"), path)
    name, p = next(iter(tiny_unet("sd15").named_parameters()))
    save_file({name: torch.zeros(*p.shape, 2)}, str(path))
    with pytest.raises(ValueError, match="shapes"):
        load_unet_weights(tiny_unet("sd15"), path)


def test_hub_ids_fail_clearly_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="owner/model"):
        load_controlnext("owner/model/controlnet.safetensors")
    with pytest.raises(FileNotFoundError, match="owner/model"):
        load_controlnext("owner/model")
