"""`controlnext train`: flags and their errors, the trainable set, outputs and their loaders, validation, SDXL."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from controlnext import ControlNeXtModel
from controlnext.cli import main as cli_main
from controlnext.training import parse_train_args, train


def _args(base, data, out, *extra):
    return [
        "--pretrained-model", str(base), "--dataset", str(data), "--output-dir", str(out), "--resolution", "64",
        "--controlnext-config", "tiny", "--train-batch-size", "4", "--learning-rate", "1e-3",
        "--unet-learning-rate", "1e-3", "--cpu-threads", "1", "--report-to", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sd15_run(sd15, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15_run")
    result = train(parse_train_args(_args(sd15, shapes, out, "--max-train-steps", "3", "--random-flip")))
    return result, out


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (["--caption-dropout", "1.5"], r"--caption-dropout must be in \[0, 1\]"),
        (["--resolution", "60"], "--resolution must be a positive multiple of 8"),
        (["--validation-prompt", "a"], "needs both --validation-prompt and --validation-image"),
        (["--validation-image", "nope.png", "--validation-prompt", "a"], "--validation-image nope.png: no such file"),
        (["--resume-from-checkpoint", "/no/such/ckpt"], "--resume-from-checkpoint /no/such/ckpt: no such folder"),
        (["--controlnext-config", "{bad"], "--controlnext-config must be 'tiny', a JSON object or a JSON file"),
        (["--train-unet", "to_outt"], r"pattern 'to_outt' matches no parameter of this UNet"),
        (["--train-unet", "("], r"pattern '\(' is not a valid regular expression"),
        (["--caption-column", "prompt"], r"no caption column 'prompt'.*--caption-column"),
        (["--family", "sdxl"], "--family sdxl was given but the base model .* looks like sd15"),
        (["--dataset", "someone/no-such-dataset"], "is not a local path and could not be loaded from the hub"),
        (["--pretrained-model", "./no/such/base"], "no such folder, and not a hub id"),
        (["--pretrained-model", "someone/no-such-model"], "Could not load the base model 'someone/no-such-model'"),
        (["--train-unet", "none", "to_out"], "--train-unet none cannot be combined"),
        (["--use-ema", "--ema-decay", "1.5"], r"--ema-decay must be in \(0, 1\)"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--unet-learning-rate", "inf"], "--unet-learning-rate must be a finite number, got inf"),
        (["--learning-rate", "50"], r"--learning-rate must be in \(0, 1\], got 50"),
        (["--adam-epsilon", "nan"], "--adam-epsilon must be a finite number, got nan"),
        (["--adam-beta2", "1"], r"--adam-beta2 must be in \[0, 1\), got 1"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number, got inf"),
        (["--noise-offset", "inf"], "--noise-offset must be a finite number, got inf"),
        (["--snr-gamma", "nan"], "--snr-gamma must be a finite number, got nan"),
        (["--mixed-precision", "fp16", "--cpu"], "--mixed-precision fp16 needs a GPU.*use --mixed-precision bf16"),
        (["--resolution", "100000"], "--resolution must be at most 4096, got 100000"),
    ],
)
def test_bad_flags_give_one_line_errors(sd15, shapes, tmp_path, capsys, extra, message):
    code = cli_main(["train", *_args(sd15, shapes, tmp_path / "out", "--max-train-steps", "1", *extra)])
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("controlnext train: error:")]
    assert line and re.search(message, line[0]), err


def test_missing_inputs_and_bad_choices(tmp_path, capsys):
    code = cli_main(["train", "--pretrained-model", str(tmp_path), "--dataset", str(tmp_path)])
    assert code == 2
    assert "lacks unet, vae, text_encoder, tokenizer, scheduler/" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--pretrained-model", "x", "--dataset", "y", "--control-injection", "add"])
    assert info.value.code == 2
    assert "invalid choice: 'add'" in capsys.readouterr().err


def test_8bit_adam_without_bitsandbytes_is_explained(sd15, shapes, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    code = cli_main(["train", *_args(sd15, shapes, tmp_path, "--max-train-steps", "1", "--use-8bit-adam")])
    assert code == 2 and "--use-8bit-adam needs bitsandbytes" in capsys.readouterr().err


def test_wandb_only_when_installed(sd15, shapes, tmp_path, capsys):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    code = cli_main(["train", *_args(sd15, shapes, tmp_path, "--max-train-steps", "1", "--report-to", "wandb")])
    assert code == 2 and "--report-to wandb needs the wandb package" in capsys.readouterr().err


def test_accelerate_example_configs(tmp_path):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(root.glob("*.yaml"))}
    assert set(configs) == {"1gpu", "8gpu", "multinode", "deepspeed_zero2", "fsdp"}
    assert (configs["1gpu"].num_processes, configs["1gpu"].distributed_type.value) == (1, "NO")
    assert (configs["8gpu"].num_processes, configs["8gpu"].distributed_type.value) == (8, "MULTI_GPU")
    assert (configs["multinode"].num_machines, configs["multinode"].num_processes) == (2, 16)
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert configs["fsdp"].fsdp_config["fsdp_use_orig_params"] is True  # frozen + trained params share modules


def test_fine_tuning_starts_from_a_given_module(sd15, shapes, sd15_run, tmp_path):
    from controlnext.loading import load_controlnext

    _, first = sd15_run
    start = load_controlnext(first / "controlnext.safetensors")
    result = train(
        parse_train_args(
            _args(
                sd15,
                shapes,
                tmp_path,
                "--max-train-steps",
                "1",
                "--controlnext",
                str(first / "controlnext.safetensors"),
            )
        )
    )
    assert result.controlnext.config.embedding_channels == start.config.embedding_channels  # its config, not a new one
    moved = [(result.controlnext.state_dict()[k] - v).abs().max().item() for k, v in start.state_dict().items()]
    assert 0 < max(moved) < 5e-3  # one step (lr 1e-3) away from the given weights, not from a random start


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--control-injection", "--train-unet", "--resume-from-checkpoint", "--checkpoints-total-limit"):
        assert flag in out


# ------------------------------------------------------------------------------------------------ trainable set
def test_trainable_set_follows_the_pattern_and_frozen_weights_stay_bitwise(sd15, sd15_run):
    from diffusers import UNet2DConditionModel

    result, _ = sd15_run
    fresh = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    expected = [n for n, _ in fresh.named_parameters() if "to_out" in n]  # the published SD1.5 choice
    assert result.trainable.unet_names == expected and len(expected) == 16
    params = dict(fresh.named_parameters())
    assert result.trainable.unet_trainable == sum(params[n].numel() for n in expected)
    assert result.trainable.unet_frozen == sum(p.numel() for n, p in params.items() if n not in expected)
    assert result.trainable.control_trainable == sum(p.numel() for p in result.controlnext.parameters())
    changed = 0
    for name, trained in result.unet.named_parameters():
        same = torch.equal(trained.detach(), params[name].detach())
        if name in expected:
            changed += not same
            assert trained.requires_grad
        else:
            assert same, f"frozen parameter {name} changed"
            assert not trained.requires_grad
    assert changed == len(expected)


def test_outputs_load_back_through_the_loaders_and_match(sd15, sd15_run):
    from diffusers import UNet2DConditionModel

    from controlnext import ControlNeXtModel, attached
    from controlnext.loading import load_controlnext, load_unet_weights

    result, out = sd15_run
    for name in ("controlnext/config.json", "controlnext.safetensors", "unet_weights.safetensors", "README.md"):
        assert (out / name).is_file(), name
    from_file = load_controlnext(out / "controlnext.safetensors")
    from_folder = ControlNeXtModel.from_pretrained(out / "controlnext")
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    mode, keys = load_unet_weights(unet, out / "unet_weights.safetensors")
    assert mode == "values" and keys == sorted(result.trainable.unet_names)

    torch.manual_seed(0)
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 64, 64)
    result.unet.eval()
    with torch.no_grad():
        with attached(result.unet, result.controlnext.eval(), conditions=cond):
            want = result.unet(x, t, emb).sample
        for module in (from_file, from_folder):
            with attached(unet, module.eval(), conditions=cond):
                got = unet(x, t, emb).sample
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        plain = unet(x, t, emb).sample
    assert (want - plain).abs().mean() > 1e-3  # the control really changes the output


def test_model_card_and_summary(sd15_run, sd15, shapes):
    result, out = sd15_run
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and str(sd15) in card
    assert "3 optimisation steps" in card and str(shapes) in card and "32 rows used" in card
    assert "--max-train-steps 3" in card  # the command line
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["rows"] == 32 and summary["bad_rows"] == []
    assert summary["trainable"]["unet_tensors"] == 16 and len(summary["rank_fingerprints"]) == 1


def test_sdxl_trains_published_subset_and_saves_deltas(sdxl, shapes, tmp_path):
    from diffusers import UNet2DConditionModel

    from controlnext.loading import load_unet_weights

    out = tmp_path / "xl"
    result = train(parse_train_args(_args(sdxl, shapes, out, "--max-train-steps", "2", "--save-unet-as", "deltas")))
    names = result.trainable.unet_names
    assert names and all(re.fullmatch(r".*attn2.*to_out.*", n) for n in names)
    fresh = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    assert names == [n for n, _ in fresh.named_parameters() if re.search(".*attn2.*to_out.*", n)]
    assert any("attn1.to_out" in n for n, _ in fresh.named_parameters())  # self-attention stays frozen
    assert result.controlnext.config.variant == "sdxl"
    deltas = load_file(out / "unet_weight_increasements.safetensors")
    assert sorted(deltas) == sorted(names) and any(d.abs().max() > 0 for d in deltas.values())
    mode, _ = load_unet_weights(fresh, out / "unet_weight_increasements.safetensors")
    assert mode == "deltas"
    trained = dict(result.unet.named_parameters())
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p, trained[n].detach(), rtol=0, atol=1e-7)


def test_zero_conv_ablation_and_validation_grid(sd15, shapes, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "zc"
    cond = shapes / "conditions" / "0000.png"
    result = train(
        parse_train_args(
            _args(
                sd15, shapes, out, "--max-train-steps", "2", "--control-injection", "zero_conv",
                "--report-to", "tensorboard", "--validation-prompt", "a red circle", "--validation-image", str(cond),
                "--validation-steps", "2", "--validation-inference-steps", "2",
            )
        )
    )  # fmt: skip
    module = result.controlnext
    assert module.config.normalization == "zero_conv"
    assert module.zero_conv.weight.abs().max() > 0  # trained away from its zero initialisation
    grid = out / "validation" / "step-0000002.png"
    from PIL import Image

    assert Image.open(grid).size == (128, 64)  # condition + one generated image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = events.Tags()
    assert "validation" in tags["images"] and "loss" in tags["scalars"]


def test_gradient_checkpointing_and_loader_workers_do_not_change_training(sd15, shapes, sd15_run, tmp_path):
    ref, ref_out = sd15_run
    out = tmp_path / "gc"
    extra = ["--max-train-steps", "3", "--random-flip", "--gradient-checkpointing", "--dataloader-num-workers", "2"]
    result = train(parse_train_args(_args(sd15, shapes, out, *extra)))
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)
    a, b = load_file(out / "controlnext.safetensors"), load_file(ref_out / "controlnext.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bf16_mixed_precision_keeps_trained_weights_in_float32(sd15, shapes, sd15_run, tmp_path):
    ref, _ = sd15_run
    out = tmp_path / "bf16"
    extra = ["--max-train-steps", "3", "--random-flip", "--mixed-precision", "bf16"]
    result = train(parse_train_args(_args(sd15, shapes, out, *extra)))
    dtypes = {(p.dtype, p.requires_grad) for p in result.unet.parameters()}
    assert dtypes == {(torch.bfloat16, False), (torch.float32, True)}  # frozen weights in bf16, trained in fp32
    assert all(p.dtype == torch.float32 for p in result.controlnext.parameters())
    assert result.losses == pytest.approx(ref.losses, rel=2e-2)  # same run up to bf16 rounding
    assert all(v.dtype == torch.float32 for v in load_file(out / "controlnext.safetensors").values())


# ------------------------------------------------------------------------------------------------ hardening
def test_resolution_beyond_the_maximum_is_refused_before_anything_is_loaded():
    from controlnext.training import TrainConfig

    with pytest.raises(ValueError, match="--resolution must be at most 4096, got 100000"):
        TrainConfig(pretrained_model="base", dataset="data", resolution=100000).validate()
    TrainConfig(pretrained_model="base", dataset="data", resolution=4096).validate()


def test_resolution_must_suit_the_base_models_vae(sd15, shapes, tmp_path, capsys):
    import shutil

    from diffusers import AutoencoderKL

    base = tmp_path / "vae16"  # the tiny base with a VAE that downsamples 16x (5 blocks)
    shutil.copytree(sd15, base, ignore=shutil.ignore_patterns("vae"))
    blocks = 5
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(base / "vae")
    code = cli_main(["train", *_args(base, shapes, tmp_path / "out", "--max-train-steps", "1", "--resolution", "72")])
    err = capsys.readouterr().err
    assert code == 2 and "--resolution must be a multiple of 16 (this base's VAE downsampling), got 72" in err, err


def test_module_for_another_family_is_refused_before_training(sd15, shapes, tmp_path, capsys):
    from controlnext.inject import injection_channels
    from controlnext.loading import save_controlnext_file
    from controlnext.models.variants import variant_config
    from controlnext.testing import TINY_CONTROLNEXT
    from controlnext.training.base import load_base_model

    unet = load_base_model(str(sd15)).unet
    channels = injection_channels(unet, variant_config("sdxl")["injection_point"])  # fits this UNet's shapes
    sdxl_module = ControlNeXtModel.from_variant("sdxl", out_channels=channels, **TINY_CONTROLNEXT)
    path = save_controlnext_file(sdxl_module, tmp_path / "sdxl-module.safetensors")
    out = tmp_path / "out"
    code = cli_main(["train", *_args(sd15, shapes, out, "--max-train-steps", "1", "--controlnext", str(path))])
    err = capsys.readouterr().err
    assert code == 2 and "looks like a 'sdxl' module (for sdxl UNets) but the UNet is sd15" in err, err
    assert not (out / "controlnext.safetensors").exists() and not (out / "checkpoints").exists()


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("controlnext train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(sd15, shapes, tmp_path, capsys, monkeypatch):
    import torch.nn.functional as F

    from controlnext.training import checkpoint as ckpt

    real, calls = F.mse_loss, []

    def mse_nan_at_step_3(*a, **k):  # a loss that overflows at the third step (one micro-step per step)
        calls.append(1)
        value = real(*a, **k)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(F, "mse_loss", mse_nan_at_step_3)
    out = tmp_path / "nan"
    args = _args(sd15, shapes, out, "--max-train-steps", "5", "--checkpointing-steps", "1")
    assert cli_main(["train", *args]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "The training loss is nan at step 3" in line and str(out / "checkpoints" / "checkpoint-2") in line
    root = out / "checkpoints"
    assert ckpt.latest_checkpoint(root) == root / "checkpoint-2" and not (root / "checkpoint-3").exists()
    ckpt.verify_checkpoint(root / "checkpoint-2")
    saved = load_file(root / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (out / "controlnext.safetensors").exists()  # nothing exported from a diverged run


def test_non_finite_loaded_weights_are_named_in_a_warning(sd15, shapes, sd15_run, tmp_path, capsys, caplog):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, first = sd15_run
    module = load_file(first / "controlnext.safetensors")
    key = sorted(module)[0]
    module[key] = module[key].clone().fill_(float("inf"))
    with_inf = tmp_path / "inf-module.safetensors"
    with safe_open(str(first / "controlnext.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(module, str(with_inf), metadata=meta)
    base = tmp_path / "nan-base"
    shutil.copytree(sd15, base)
    unet_file = next((base / "unet").glob("*.safetensors"))
    unet = load_file(unet_file)
    name = sorted(unet)[0]
    unet[name] = unet[name].clone().fill_(float("nan"))
    save_file(unet, str(unet_file), metadata={"format": "pt"})

    for pretrained, start, what in [(sd15, with_inf, f"--controlnext {with_inf}"), (base, None, "(unet)")]:
        caplog.clear()
        extra = ["--controlnext", str(start)] if start else []
        with caplog.at_level("WARNING", logger="controlnext.train"):
            code = cli_main(["train", *_args(pretrained, shapes, tmp_path / "o", "--max-train-steps", "1", *extra)])
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert what in warning and "hold NaN or inf" in warning, warning
        assert (key if start else name) in warning
        # Training from them gives a NaN loss at once: stopped at step 1, nothing written.
        assert code == 2 and re.search(r"loss is (nan|inf|-inf) at step 1", _error_line(capsys.readouterr().err))


def test_timestep_free_module_trains_and_generates(sd15, shapes, sd15_run, tmp_path):
    """--timestep-free: a module without timestep input is trained, exported and generates through the pipeline."""
    from controlnext.loading import load_controlnext
    from controlnext.pipelines import StableDiffusionControlNeXtPipeline

    out = tmp_path / "tf"
    result = train(parse_train_args(_args(sd15, shapes, out, "--max-train-steps", "2", "--timestep-free")))
    assert result.controlnext.config.use_timestep is False
    keys = set(load_file(out / "controlnext.safetensors"))
    assert keys and not any(k.startswith("time_") for k in keys)
    module = load_controlnext(out / "controlnext.safetensors")
    assert module.config.use_timestep is False
    pipe = StableDiffusionControlNeXtPipeline.from_pretrained(str(sd15), controlnext=module)
    image = pipe("a red circle", control_image=torch.rand(3, 64, 64), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # A module with a timestep input cannot be continued as a timestep-free one.
    timed = sd15_run[1] / "controlnext.safetensors"
    with pytest.raises(ValueError, match="has a timestep input"):
        train(parse_train_args(_args(sd15, shapes, tmp_path / "again", "--max-train-steps", "1", "--timestep-free",
                                     "--controlnext", str(timed))))  # fmt: skip
