"""`controlnext bench` on the transformer families (SD3, Flux): the presets at full size on the meta device (FLOPs and
parameters against diffusers' SD3/Flux ControlNets at community layer counts), the timed path on tiny models, and the
argument checks that are specific to them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from controlnext.bench import PRESETS, BenchConfig, build_controlnet, build_unet
from controlnext.bench.presets import SD35_CONTROLNET
from controlnext.cli import main

GOAL_FLOPS = 0.02  # ControlNeXt's per-step FLOP overhead vs the base
GOAL_PARAMS = 0.01  # ControlNeXt's added parameters vs the ControlNet row's
FULL_SIZE = ("sd3-1024", "sd35-large-1024", "flux-1024")
# Parameters of the published transformers (independent of this code), and how exactly they are known: SD3-medium
# 2,028,328,000 and Flux.1-dev 11,901,408,320; SD3.5-large "8.1B" (its model card).
PUBLISHED = {"sd3-1024": (2_028_328_000, 0), "sd35-large-1024": (8.1e9, 0.01), "flux-1024": (11_901_408_320, 0)}


def _bench(*args: str) -> tuple[dict, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "--quiet", "--json", *args]) == 0
    out = buf.getvalue()
    return json.loads(out.strip().splitlines()[-1]), out


def _rows(data: dict) -> dict[tuple[str, bool], dict]:
    return {(r["name"], r["cfg"]): r for r in data["rows"]}


@pytest.fixture(scope="module")
def full_size() -> dict[str, dict]:
    """The full-size presets, FLOPs and parameters only (meta device: nothing is allocated)."""
    return {preset: _bench("--preset", preset, "--flops-only") for preset in FULL_SIZE}


def test_flux_flops_only_json_is_the_last_line_and_has_the_row_format(full_size):
    data, out = full_size["flux-1024"]
    assert out.rstrip("\n").splitlines()[-1].startswith('{"preset":"flux-1024"')
    # Flux.1-dev is guidance-distilled: one transformer call per step, no CFG batch.
    assert [(r["name"], r["cfg"], r["batch"]) for r in data["rows"]] == [
        ("base", False, 1), ("controlnext", False, 1), ("controlnet", False, 1)
    ]  # fmt: skip
    assert data["family"] == "flux" and data["device"] == "meta" and data["resolution"] == 1024
    # The same row fields as the UNet presets (tests/test_bench.py reads them), timing fields empty.
    ci_fields = set(_rows(full_size["sd3-1024"][0])[("base", False)])
    assert set(data["rows"][0]) == ci_fields
    assert all(r["step_seconds"] is None and r["peak_mem_bytes"] is None for r in data["rows"])
    assert data["command"] == "controlnext bench --preset flux-1024 --flops-only"


@pytest.mark.parametrize(
    "preset, modes", [("sd3-1024", (False, True)), ("sd35-large-1024", (False, True)), ("flux-1024", (False,))]
)
def test_full_size_rows_and_architectures(full_size, preset, modes):
    rows = _rows(full_size[preset][0])
    assert set(rows) == {(n, g) for n in ("base", "controlnext", "controlnet") for g in modes}
    for (_, cfg), r in rows.items():
        assert r["batch"] == (2 if cfg else 1) and r["flops_per_step"] > 0
    model = build_unet(PRESETS[preset], torch.device("meta"), torch.float32)
    published, rel = PUBLISHED[preset]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=rel, abs=0)
    controlnet = build_controlnet(model, torch.float32, PRESETS[preset])
    expected = dict(PRESETS[preset].controlnet_config)
    assert {k: controlnet.config[k] for k in expected} == expected
    assert rows[("controlnet", modes[0])]["added_params"] == sum(p.numel() for p in controlnet.parameters())
    if preset == "sd3-1024":
        # InstantX/SD3-Controlnet-Canny's fp16 weights file is 1.19 GB: 6 layers, plus the stored sin-cos table.
        stored = sum(t.numel() for t in [*controlnet.parameters(), *controlnet.buffers()])
        assert stored * 2 == pytest.approx(1.19e9, rel=0.005)
    # Widths come from the base: the ControlNet and the module work at the transformer's inner width.
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert controlnet.config.num_attention_heads * controlnet.config.attention_head_dim == width


@pytest.mark.parametrize("preset", FULL_SIZE)
def test_controlnext_adds_at_most_one_percent_of_the_controlnet_parameters(full_size, preset):
    rows = _rows(full_size[preset][0])
    ours, theirs = rows[("controlnext", False)]["added_params"], rows[("controlnet", False)]["added_params"]
    assert 0 < ours <= GOAL_PARAMS * theirs


@pytest.mark.parametrize(
    "preset, cfg",
    [(p, True) for p in ("sd3-1024", "sd35-large-1024")] + [(p, False) for p in FULL_SIZE],
)
def test_controlnext_flop_overhead_at_most_two_percent(full_size, preset, cfg):
    """With and without the CFG batch (Flux-dev is guidance-distilled: no CFG batch). The tightest case is
    SD3-medium at batch 1, where the encoder's per-step part is set against one sample (docs/benchmarks.md)."""
    rows = _rows(full_size[preset][0])
    base, ours = rows[("base", cfg)]["flops_per_step"], rows[("controlnext", cfg)]["flops_per_step"]
    assert 0 < ours / base - 1 <= GOAL_FLOPS
    assert rows[("controlnext", cfg)]["flops_overhead"] == pytest.approx(ours / base - 1)
    # ControlNet costs an order of magnitude more per step in the same run.
    assert rows[("controlnet", cfg)]["flops_overhead"] > 10 * rows[("controlnext", cfg)]["flops_overhead"]


def test_sd3_guidance_batch_encodes_the_condition_once(full_size):
    """Under SD3's CFG batch the encoder runs on the one condition: its per-step FLOPs do not grow with the batch
    (so the overhead halves), while ControlNet runs on both halves."""
    rows = _rows(full_size["sd3-1024"][0])

    def extra(name: str, cfg: bool) -> int:
        return rows[(name, cfg)]["flops_per_step"] - rows[("base", cfg)]["flops_per_step"]

    assert extra("controlnext", True) == extra("controlnext", False)
    assert extra("controlnet", True) == 2 * extra("controlnet", False)


@pytest.mark.parametrize("preset", ["ci-sd3", "ci-flux"])
def test_tiny_transformer_presets_time_every_row(preset):
    data, out = _bench("--preset", preset, "--repeats", "1", "--steps", "1")
    rows = _rows(data)
    modes = (False, True) if preset == "ci-sd3" else (False,)
    assert set(rows) == {(n, g) for n in ("base", "controlnext", "controlnet") for g in modes}
    for (name, _), r in rows.items():
        assert r["step_seconds"] > 0 and r["peak_mem_bytes"] > 0 and r["flops_per_step"] > 0
        assert (r["control_cpu_seconds"] is None) if name == "base" else (r["control_cpu_seconds"] > 0)
    assert rows[("controlnext", False)]["prepare_flops"] > 0  # the cached prefix, once per generation


def test_flux_with_a_cfg_batch_is_a_clear_error(capsys):
    assert main(["bench", "--quiet", "--preset", "flux-1024", "--flops-only", "--cfg", "on"]) == 2
    err = capsys.readouterr().err
    assert "guidance-distilled" in err and "--cfg off" in err and "Traceback" not in err
    assert BenchConfig(preset="flux-1024", guidance=(False, True)).resolved().guidance == (False,)


# ---------------------------------------------------------------------------------------------- rows vs pipelines
def _pipeline_step_flops(pipe, family: str, **extra) -> dict[str, int]:
    """FLOPs per top-level module of one denoising step of a tiny stock or ControlNeXt pipeline at 64 px."""
    from controlnext.bench import _flop_counter

    with torch.inference_mode(), _flop_counter() as counter:
        pipe("a red circle", control_image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
             height=64, width=64, num_inference_steps=1, guidance_scale=5.0 if family == "sd3" else 3.5,
             max_sequence_length=16, output_type="latent", **extra)  # fmt: skip
    return {k: sum(v.values()) for k, v in counter.get_flop_counts().items() if "." not in k}


def _row_flops(row, model, family: str) -> tuple[int, int]:
    """(per-generation, per-step) FLOPs of a bench row with the inputs a 64 px pipeline call makes."""
    from controlnext.bench import _flop_counter, make_inputs

    cfg = family == "sd3"
    inputs = make_inputs(model, 64, 2 if cfg else 1, torch.float32, 0, text_tokens=77 + 16 if cfg else 16)
    with torch.inference_mode():
        with _flop_counter() as prepare:
            row.begin(inputs, cfg)
        with _flop_counter() as step:
            row.step(0)
        row.end()
    return prepare.get_total_flops(), step.get_total_flops()


# The tiny SD3 base with SD3.5's ControlNet layout (2 layers instead of 19).
SD35_LIKE = dataclasses.replace(PRESETS["ci-sd3"], controlnet_config=tuple(dict(SD35_CONTROLNET, num_layers=2).items()))


@pytest.mark.parametrize(
    "family, preset",
    [("sd3", PRESETS["ci-sd3"]), ("sd3", SD35_LIKE), ("flux", PRESETS["ci-flux"])],
    ids=["sd3", "sd35-controlnet", "flux"],
)
def test_controlnet_row_costs_what_the_stock_controlnet_pipeline_step_costs(tmp_path, family, preset):
    """The ControlNet row against diffusers' own StableDiffusion3ControlNetPipeline / FluxControlNetPipeline (one step,
    CFG for SD3, a control mode for the Flux union layout): the ControlNet and transformer FLOPs agree exactly. With
    SD3.5's ControlNet layout (no text stream, the transformer's patch embedding) as well."""
    from diffusers import FluxControlNetPipeline, StableDiffusion3ControlNetPipeline

    from controlnext.bench import controlnet_row
    from controlnext.testing.models import tiny_dit_pipeline_components

    comps = tiny_dit_pipeline_components(family, tmp_path)
    model = comps["transformer"]
    controlnet = build_controlnet(model, torch.float32, preset)
    cls = StableDiffusion3ControlNetPipeline if family == "sd3" else FluxControlNetPipeline
    pipe = cls(**comps, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    stock = _pipeline_step_flops(pipe, family, **({"control_mode": 0} if family == "flux" else {}))
    prepare, step = _row_flops(controlnet_row(model, family, controlnet), model, family)
    assert prepare == 0 and step == stock[type(model).__name__] + stock[type(controlnet).__name__]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_controlnext_row_costs_what_our_pipeline_step_costs(tmp_path, family):
    """The ControlNeXt row against our pipeline's first step (which also encodes the timestep-independent prefix,
    the row's per-generation work): the same FLOPs inside the transformer call."""
    from controlnext.bench import build_controlnext
    from controlnext.bench.rows import _ControlNeXtRow
    from controlnext.pipelines import FluxControlNeXtPipeline, StableDiffusion3ControlNeXtPipeline
    from controlnext.testing.models import tiny_dit_pipeline_components

    comps = tiny_dit_pipeline_components(family, tmp_path)
    model = comps["transformer"]
    module = build_controlnext(PRESETS[f"ci-{family}"], "controlnext", model, torch.float32)
    cls = StableDiffusion3ControlNeXtPipeline if family == "sd3" else FluxControlNeXtPipeline
    pipe = cls(**comps, controlnext=module)
    pipe.set_progress_bar_config(disable=True)
    stock = _pipeline_step_flops(pipe, family)
    prepare, step = _row_flops(_ControlNeXtRow(model, family, "controlnext", module), model, family)
    assert prepare > 0 and prepare + step == stock[type(model).__name__]
