"""The convergence study's methods: which parameters each one trains (the fairness of the comparison rests on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def loop():
    return _load("train_demo_controlnext", ROOT / "scripts" / "train_demo_controlnext.py")


@pytest.fixture(scope="module")
def base(loop):
    from controlnext.shapes.demo import demo_assets

    if demo_assets() is None:
        pytest.skip("shipped demo base not installed")
    return loop.load_base(demo_assets() / "base")


@pytest.mark.parametrize("name", ["cross_norm", "cross_norm_unet", "timestep_free_unet", "t2i_adapter"])
def test_method_trains_only_its_parameters(loop, base, name):
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    method = loop.Method(name, base, seed=0)
    try:
        data = loop.prepare_data(base, "edges", 16, seed=1)
        loop.train(method, data, steps=2, batch=4, lr=1e-2, log_every=0)
        changed = {n for n, p in base.unet.named_parameters() if not torch.equal(p, before[n])}
        if name in ("cross_norm", "t2i_adapter"):
            assert changed == set()
        else:
            assert changed and all("to_out" in n for n in changed)
            assert changed == {n for n in before if "to_out" in n}
    finally:
        method.close()
        base.unet.load_state_dict(before)
        base.unet.requires_grad_(False)


def test_steps_to_and_curve_score():
    conv = _load("convergence_study", ROOT / "benchmarks" / "convergence.py")
    hist = [{"step": 0, "fidelity": 0.9}, {"step": 50, "fidelity": 0.4}, {"step": 100, "fidelity": 0.6}]
    assert conv.steps_to(hist, 0.5) == 0
    assert conv.steps_to(hist[1:], 0.5) == 100
    assert conv.steps_to(hist[1:], 0.7) is None
    assert conv.curve_score(hist) == pytest.approx(0.5)  # step 0 excluded


def test_data_cache_is_keyed_by_the_encoders_content(tmp_path):
    import argparse
    import shutil

    conv = _load("convergence_study", ROOT / "benchmarks" / "convergence.py")
    for name in ("a", "b"):
        for part in ("vae", "text_encoder", "tokenizer"):
            (tmp_path / name / part).mkdir(parents=True)
            (tmp_path / name / part / "weights.bin").write_bytes(b"same")

    def key(name: str, **over) -> Path:
        args = dict(base=str(tmp_path / name), condition="edges", n=8, data_seed=1)
        args.update(over)
        return conv.data_cache(argparse.Namespace(**args))

    assert key("a") == key("b")  # same content in another folder: shared
    assert key("a") != key("a", n=9) and key("a") != key("a", condition="mask")
    (tmp_path / "b" / "text_encoder" / "weights.bin").write_bytes(b"retrained")
    assert key("a") != key("b")  # a retrained encoder in place must not reuse the old cache
    before = key("a")
    shutil.copy(tmp_path / "a" / "tokenizer" / "weights.bin", tmp_path / "a" / "tokenizer" / "vocab.json")
    assert key("a") != before  # the tokenizer is part of the key too
