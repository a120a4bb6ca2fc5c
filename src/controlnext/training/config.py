"""Training settings: one dataclass, its command-line form, and the published per-family defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..families import families, get_family
from ..sources import is_local_path, require_dataset_source, require_model_source
from .options import (
    DATA,
    MODEL,
    OPTIMISATION,
    OUTPUTS,
    VALIDATION,
    add_config_arguments,
    config_from_namespace,
    default_mixed_precision,
    option,
    shared,
)

__all__ = [
    "MAX_RESOLUTION",
    "TrainConfig",
    "add_train_arguments",
    "check_range",
    "config_from_args",
    "parse_control_overrides",
    "parse_train_args",
]

# Flow matching (SD3, Flux): diffusers' weighting schemes. logit_normal and mode shape the timestep density (loss
# weight 1); cosmap and sigma_sqrt sample uniformly and weight the loss; none is uniform and unweighted.
FLOW_WEIGHTINGS = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")

# The largest training side accepted: beyond it one sample does not fit any current accelerator.
MAX_RESOLUTION = 4096


def _image_families() -> list[str]:
    """The families ``controlnext train`` takes: the image UNets and transformers (the video family has
    ``train-video``)."""
    return [f.name for f in families() if not f.video]


def check_range(
    flag: str, value: float | None, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` (None: not set) is a finite number within [low, high] (or open ends).

    ``float("inf")`` and ``nan`` parse as floats from the command line; they would train to all-NaN weights.
    """
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}.")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{flag} must be in {bounds}, got {value}.")


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` fields take the base model family's published default.

    Each field's command-line form (``controlnext train --help``) is declared with it; see :mod:`.options`.
    """

    # model
    pretrained_model: str = shared(
        "pretrained_model",
        "",
        flags=("--model", "--pretrained-model-name-or-path"),
        help="Base model: a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), a hub id "
        "('owner/name') or demo (the shipped 64 px model).",
    )
    output_dir: str = shared("output_dir", "controlnext-model")
    family: str = option(
        "auto",
        help="Base model family; auto: detected from the base model.",
        choices=lambda: ["auto", *_image_families()],
        group=MODEL,
    )
    revision: str | None = option(None, help="Hub revision of the base model.", default_text="main", group=MODEL)
    base_variant: str | None = option(
        None,
        help="Hub file variant of the base model weights (e.g. fp16).",
        default_text="the plain files",
        group=MODEL,
    )
    pretrained_vae: str | None = option(
        None, help="A different VAE (e.g. an fp16-safe SDXL VAE).", default_text="the base model's", group=MODEL
    )
    controlnext: str | None = shared(
        "controlnext", None, help="Start from this control module (folder, file, hub id, or a zoo name: see "
        "`controlnext models`)."
    )
    controlnext_variant: str | None = option(
        None,
        help="Layout of a new control module.",
        choices=lambda: [v for name in _image_families() for v in get_family(name).variants],
        default_text="the family's: sd15-training for SD1.5, sdxl for SDXL, sd3 / flux for SD3 / Flux",
        group=MODEL,
    )
    controlnext_config: str | None = shared("controlnext_config", None)
    control_injection: str = option(
        "cross_norm",
        help="cross_norm (ControlNeXt) or zero_conv (the paper's ablation: zero-initialised 1x1 conv).",
        choices=("cross_norm", "zero_conv"),
        group=MODEL,
    )
    timestep_free: bool = option(
        False,
        help="Train a control module without timestep input: its whole output is computed once per generation, so "
        "each step pays only Cross Normalization (docs/convergence.md). Not a published layout.",
        group=MODEL,
    )
    train_unet: list[str] | None = shared(
        "train_unet",
        None,
        help="Regexes (re.search) of UNet (or transformer) parameter names to train; 'none' trains the control module "
        "only; {after} stands for the index of a block after the injection point.",
        default_text="as published: 'to_out' for SD1.5, '.*attn2.*to_out.*' for SDXL; SD3/Flux: the image "
        "attention output projections of the blocks after the injection point",
    )
    # data
    dataset: str = option(
        "",
        help="imagefolder with metadata.jsonl/csv, saved dataset, .parquet file/folder, hub dataset id, or a shard "
        "set to stream: a folder of .tar shards, a brace or glob pattern of .tar/.parquet files.",
        flags=("--dataset", "--dataset-name", "--train-data-dir"),
        required=True,
        group=DATA,
    )
    dataset_config: str | None = option(None, help="Hub dataset configuration name.", default_text="the hub's default",
                                        group=DATA)  # fmt: skip
    dataset_split: str = option("train", help="Dataset split to train on.", group=DATA)
    cache_dir: str | None = option(
        None, help="Cache folder for hub datasets.", default_text="the datasets library's", group=DATA
    )
    image_column: str = option("image", help="Column of the target images.", group=DATA)
    condition_column: str = option(
        "conditioning_image",
        help="Column of the condition images.",
        flags=("--condition-column", "--conditioning-image-column"),
        group=DATA,
    )
    caption_column: str = option("text", help="Column of the captions.", group=DATA)
    resolution: int | None = option(
        None, help="Training size in pixels (a multiple of 8; of 16 for SD3/Flux).",
        default_text="512 for SD1.5, 1024 for SDXL, SD3 and Flux", group=DATA
    )
    center_crop: bool = option(False, help="Center crop instead of random crop.", group=DATA)
    random_flip: bool = option(False, help="Flip image and condition together with probability 0.5.", group=DATA)
    bucketing: bool = option(
        False, help="Group images into aspect-ratio buckets of about resolution² pixels.", group=DATA
    )
    bucket_step: int = option(64, help="Bucket sides are multiples of this.", group=DATA)
    caption_dropout: float = option(
        0.0,
        help="Probability of an empty caption (for classifier-free guidance).",
        flags=("--caption-dropout", "--proportion-empty-prompts"),
        group=DATA,
    )
    on_bad_row: str = option(
        "skip",
        help="Skip bad rows (reported and counted) or stop at the first one.",
        choices=("skip", "error"),
        group=DATA,
    )
    check_data: bool = option(True, help="Check every row's files and sizes before training.", group=DATA)
    max_train_samples: int | None = option(
        None, help="Use only the first N rows (debugging).", default_text="all rows", group=DATA
    )
    dataloader_num_workers: int = shared("dataloader_num_workers", 0)
    streaming: bool = option(
        False,
        help="Stream parquet files or a hub dataset as shards, without a scan up front (.tar shard sets always "
        "stream).",
        group=DATA,
    )
    shuffle_buffer: int = option(1000, help="Samples in each data-loader worker's shuffle buffer (streaming).",
                                 group=DATA)  # fmt: skip
    # optimisation
    seed: int = shared("seed", 0)
    train_batch_size: int = shared("train_batch_size", 4)
    num_train_epochs: int = shared("num_train_epochs", 1)
    max_train_steps: int | None = shared("max_train_steps", None)
    gradient_accumulation_steps: int = shared("gradient_accumulation_steps", 1)
    gradient_checkpointing: bool = shared("gradient_checkpointing", False)
    learning_rate: float = shared("learning_rate", 1e-4)
    unet_learning_rate: float = shared("unet_learning_rate", 1e-5)
    scale_lr: bool = option(
        False, help="Multiply learning rates by batch size x accumulation x processes.", group=OPTIMISATION
    )
    lr_scheduler: str = shared("lr_scheduler", "constant")
    lr_warmup_steps: int = shared("lr_warmup_steps", 0)
    lr_num_cycles: int = option(1, help="Cycles of the cosine_with_restarts schedule.", group=OPTIMISATION)
    lr_power: float = option(1.0, help="Power of the polynomial schedule.", group=OPTIMISATION)
    use_8bit_adam: bool = option(False, help="8-bit AdamW from bitsandbytes (must be installed).", group=OPTIMISATION)
    adam_beta1: float = shared("adam_beta1", 0.9)
    adam_beta2: float = shared("adam_beta2", 0.999)
    adam_weight_decay: float = shared("adam_weight_decay", 1e-2)
    adam_epsilon: float = shared("adam_epsilon", 1e-8)
    max_grad_norm: float = shared("max_grad_norm", 1.0)
    mixed_precision: str = shared("mixed_precision", default_factory=default_mixed_precision)
    allow_tf32: bool = option(False, help="Allow TF32 matmuls on Ampere+ GPUs.", group=OPTIMISATION)
    use_ema: bool = option(
        False, help="Keep an EMA of the trained weights (exported instead of the raw weights).", group=OPTIMISATION
    )
    ema_decay: float = option(0.9999, help="EMA decay (with --use-ema).", group=OPTIMISATION)
    snr_gamma: float | None = option(
        None, help="Min-SNR loss weighting gamma (5.0 is typical).", default_text="no weighting", group=OPTIMISATION
    )
    noise_offset: float = option(
        0.0, help="Noise offset (adds low-frequency noise to the training noise).", group=OPTIMISATION
    )
    prediction_type: str | None = option(
        None,
        help="Training target.",
        choices=("epsilon", "v_prediction"),
        default_text="the base scheduler's",
        group=OPTIMISATION,
    )
    # flow matching (SD3, Flux), as diffusers' train_controlnet_sd3.py / train_controlnet_flux.py
    weighting_scheme: str = option(
        "logit_normal",
        help="Flow matching (SD3/Flux): logit_normal or mode shape the timestep density; cosmap or sigma_sqrt weight "
        "the loss; none: uniform and unweighted.",
        choices=FLOW_WEIGHTINGS,
        group=OPTIMISATION,
    )
    logit_mean: float = option(0.0, help="Mean of the logit_normal timestep density.", group=OPTIMISATION)
    logit_std: float = option(1.0, help="Standard deviation of the logit_normal timestep density.", group=OPTIMISATION)
    mode_scale: float = option(1.29, help="Scale of the mode timestep density.", group=OPTIMISATION)
    precondition_outputs: bool | None = option(
        None,
        help="Flow matching: regress the x0 estimate (noisy - sigma * prediction) on the clean latents instead of the "
        "prediction on the velocity.",
        default_text="yes for SD3 (as train_controlnet_sd3.py), no for Flux (as train_controlnet_flux.py)",
        group=OPTIMISATION,
    )
    guidance_scale: float | None = option(
        None,
        help="Flux: the guidance embedding's value during training (guidance-distilled transformers).",
        default_text="3.5, as train_controlnet_flux.py",
        group=OPTIMISATION,
    )
    max_sequence_length: int | None = option(
        None,
        help="T5 tokens per caption (SD3/Flux); use the same at inference.",
        default_text="the stock pipelines': 256 for SD3, 512 for Flux",
        group=OPTIMISATION,
    )
    text_embedding_cache: int = option(
        1024, help="Captions whose embeddings are kept (0: encode every batch).", group=OPTIMISATION
    )
    cpu_threads: int | None = option(
        None, help="torch CPU threads per process (1 is best on a shared machine).", default_text="torch's choice",
        group=OPTIMISATION,
    )  # fmt: skip
    cpu: bool = option(
        False, help="Train on the CPU even if a GPU is present (also chosen when none is).", group=OPTIMISATION
    )
    attention_backend: str = shared("attention_backend", "sdpa")
    # checkpoints and outputs
    checkpointing_steps: int = shared("checkpointing_steps", 500)
    checkpoints_total_limit: int | None = shared("checkpoints_total_limit", None)
    resume_from_checkpoint: str | None = shared("resume_from_checkpoint", None)
    allow_changed_settings: bool = shared("allow_changed_settings", False)
    exit_after_steps: int | None = option(
        None,
        help="Stop after this many steps in this invocation (checkpoint written; resume with "
        "--resume-from-checkpoint latest), e.g. for time-limited cluster jobs.",
        default_text="run to the end",
        group=OUTPUTS,
    )
    profile: int | None = option(
        None,
        help="Measure N optimisation steps, print samples/s per process, the data-wait share of each step and peak "
        "memory (also OUTPUT/profile.json), then stop: no checkpoint, no outputs.",
        default_text="off",
        group=OUTPUTS,
    )
    save_unet_as: str = shared("save_unet_as", "values")
    push_to_hub: bool = shared("push_to_hub", False)
    hub_model_id: str | None = shared("hub_model_id", None)
    # validation and logging
    validation_prompt: list[str] = option(
        default_factory=list, help="Prompts of the validation images.", default_text="no validation", group=VALIDATION
    )
    validation_image: list[str] = option(
        default_factory=list, help="Condition images for validation.", default_text="no validation", group=VALIDATION
    )
    validation_steps: int = option(100, help="Validate every N steps.", group=VALIDATION)
    num_validation_images: int = option(1, help="Images per validation prompt.", group=VALIDATION)
    validation_inference_steps: int = option(20, help="Denoising steps of the validation images.", group=VALIDATION)
    validation_guidance_scale: float = option(7.5, help="Guidance scale of the validation images.", group=VALIDATION)
    report_to: str = option(
        "tensorboard",
        help="Where metrics are logged.",
        choices=("none", "tensorboard", "wandb", "all"),
        group=VALIDATION,
    )
    tracker_project_name: str = option("controlnext", help="Project name of the tracker.", group=VALIDATION)
    logging_steps: int = option(1, help="Log metrics every N steps.", group=VALIDATION)
    # the command line that made this config (for the model card); filled in by the entry points
    command: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting and what is expected."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(bool(self.pretrained_model), "--model is required (a diffusers folder or hub id).")
        need(bool(self.dataset), "--dataset is required (a local folder/file or a hub dataset id).")
        if is_local_path(self.pretrained_model):  # a mistyped path is named here, not sent to the hub
            require_model_source(self.pretrained_model, "--model")
        if not any(c in self.dataset for c in "{*?[") and "://" not in self.dataset:  # shard patterns and URLs
            require_dataset_source(self.dataset, "--dataset")
        known = ["auto", *_image_families()]
        need(self.family in known, f"--family must be one of {', '.join(known)}; got {self.family!r}.")
        need(
            self.control_injection in ("cross_norm", "zero_conv"),
            f"--control-injection must be cross_norm or zero_conv, got {self.control_injection!r}.",
        )
        need(self.train_batch_size >= 1, f"--train-batch-size must be >= 1, got {self.train_batch_size}.")
        need(self.num_train_epochs >= 1, f"--num-train-epochs must be >= 1, got {self.num_train_epochs}.")
        need(
            self.max_train_steps is None or self.max_train_steps >= 1,
            f"--max-train-steps must be >= 1, got {self.max_train_steps}.",
        )
        need(self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1.")
        for flag, value in (("--learning-rate", self.learning_rate), ("--unet-learning-rate", self.unet_learning_rate)):
            need(value is not None and math.isfinite(value), f"{flag} must be a finite number, got {value}.")
        need(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}.")
        need(self.unet_learning_rate >= 0, f"--unet-learning-rate must be >= 0, got {self.unet_learning_rate}.")
        # Adam steps are about lr in size whatever the gradient: beyond 1 every weight is destroyed in a few steps.
        check_range("--learning-rate", self.learning_rate, 0, 1, low_open=True)
        check_range("--unet-learning-rate", self.unet_learning_rate, 0, 1)
        check_range("--adam-beta1", self.adam_beta1, 0, 1, high_open=True)
        check_range("--adam-beta2", self.adam_beta2, 0, 1, high_open=True)
        check_range("--adam-weight-decay", self.adam_weight_decay, 0, 1)
        check_range("--adam-epsilon", self.adam_epsilon, 0, 1, low_open=True)
        check_range("--max-grad-norm", self.max_grad_norm, 0, 1e6)
        check_range("--lr-power", self.lr_power, 0, 100, low_open=True)
        check_range("--validation-guidance-scale", self.validation_guidance_scale, 0, 100)
        need(self.lr_num_cycles >= 1, f"--lr-num-cycles must be >= 1, got {self.lr_num_cycles}.")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}.")
        need(self.text_embedding_cache >= 0, f"--text-embedding-cache must be >= 0, got {self.text_embedding_cache}.")
        need(0.0 <= self.caption_dropout <= 1.0, f"--caption-dropout must be in [0, 1], got {self.caption_dropout}.")
        need(self.on_bad_row in ("skip", "error"), f"--on-bad-row must be skip or error, got {self.on_bad_row!r}.")
        need(
            self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
            f"--resolution must be a positive multiple of 8, got {self.resolution}.",
        )
        need(
            self.resolution is None or self.resolution <= MAX_RESOLUTION,
            f"--resolution must be at most {MAX_RESOLUTION}, got {self.resolution} (SD1.5 trains at 512, SDXL at "
            "1024).",
        )
        for flag, value in (
            ("--validation-steps", self.validation_steps),
            ("--num-validation-images", self.num_validation_images),
            ("--validation-inference-steps", self.validation_inference_steps),
            ("--logging-steps", self.logging_steps),
            ("--bucket-step", self.bucket_step),
        ):
            need(value >= 1, f"{flag} must be >= 1, got {value}.")
        need(self.dataloader_num_workers >= 0, "--dataloader-num-workers must be >= 0.")
        need(self.shuffle_buffer >= 1, f"--shuffle-buffer must be >= 1, got {self.shuffle_buffer}.")
        need(self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}.")
        need(
            self.max_train_samples is None or self.max_train_samples >= 1,
            f"--max-train-samples must be >= 1, got {self.max_train_samples}.",
        )
        need(self.cpu_threads is None or self.cpu_threads >= 1, f"--cpu-threads must be >= 1, got {self.cpu_threads}.")
        need(
            not (self.train_unet and "none" in self.train_unet and len(self.train_unet) > 1),
            "--train-unet none cannot be combined with other patterns.",
        )
        need(self.checkpointing_steps >= 1, f"--checkpointing-steps must be >= 1, got {self.checkpointing_steps}.")
        need(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            f"--checkpoints-total-limit must be >= 1, got {self.checkpoints_total_limit}.",
        )
        need(
            self.exit_after_steps is None or self.exit_after_steps >= 1,
            f"--exit-after-steps must be >= 1, got {self.exit_after_steps}.",
        )
        need(self.profile is None or self.profile >= 1, f"--profile must be >= 1, got {self.profile}.")
        need(
            self.save_unet_as in ("values", "deltas"),
            f"--save-unet-as must be values or deltas, got {self.save_unet_as!r}.",
        )
        need(
            self.mixed_precision in ("no", "fp16", "bf16"),
            f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}.",
        )
        need(
            self.prediction_type in (None, "epsilon", "v_prediction"),
            f"--prediction-type must be epsilon or v_prediction, got {self.prediction_type!r}.",
        )
        need(self.snr_gamma is None or not self.snr_gamma <= 0, f"--snr-gamma must be > 0, got {self.snr_gamma}.")
        check_range("--snr-gamma", self.snr_gamma, 0, 1e6, low_open=True)
        need(self.noise_offset >= 0, f"--noise-offset must be >= 0, got {self.noise_offset}.")
        check_range("--noise-offset", self.noise_offset, 0, 1)
        need(
            self.weighting_scheme in FLOW_WEIGHTINGS,
            f"--weighting-scheme must be one of {', '.join(FLOW_WEIGHTINGS)}, got {self.weighting_scheme!r}.",
        )
        check_range("--logit-mean", self.logit_mean, -10, 10)
        check_range("--logit-std", self.logit_std, 0, 10, low_open=True)
        check_range("--mode-scale", self.mode_scale, 0, 10)
        check_range("--guidance-scale", self.guidance_scale, 0, 100)
        need(
            self.max_sequence_length is None or 1 <= self.max_sequence_length <= 512,
            f"--max-sequence-length must be in [1, 512], got {self.max_sequence_length}.",
        )
        need(0.0 < self.ema_decay < 1.0, f"--ema-decay must be in (0, 1), got {self.ema_decay}.")
        need(
            self.report_to in ("none", "tensorboard", "wandb", "all"),
            f"--report-to must be none, tensorboard, wandb or all, got {self.report_to!r}.",
        )
        n_prompts, n_images = len(self.validation_prompt), len(self.validation_image)
        need(
            n_prompts == n_images or n_prompts == 1 or n_images == 1 or n_prompts == n_images == 0,
            f"Give one --validation-prompt per --validation-image, or one of either (got {n_prompts} prompts, "
            f"{n_images} images).",
        )
        need(
            (n_prompts == 0) == (n_images == 0),
            "Validation needs both --validation-prompt and --validation-image (or neither).",
        )
        for img in self.validation_image:
            if not Path(img).is_file():
                raise FileNotFoundError(f"--validation-image {img}: no such file.")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).exists():
            raise FileNotFoundError(f"--resume-from-checkpoint {self.resume_from_checkpoint}: no such folder.")

    def control_overrides(self, variant: str | None = None) -> dict:
        """``--controlnext-config`` as ControlNeXtModel config overrides (see :func:`parse_control_overrides`).

        ``variant``: the layout the module is made with (the family's default when ``--controlnext-variant`` is not
        given), whose structure 'tiny' keeps.
        """
        return parse_control_overrides(self.controlnext_config, variant or self.controlnext_variant or "sdxl")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_control_overrides(spec: str | None, variant: str) -> dict:
    """``--controlnext-config``: None (no overrides), 'tiny' (small channel counts with ``variant``'s structure),
    inline JSON, or a JSON file of ControlNeXtModel config overrides."""
    if not spec:
        return {}
    if spec == "tiny":
        from ..testing import tiny_sizes

        return tiny_sizes(variant)
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--controlnext-config must be 'tiny', a JSON object or a JSON file; could not parse {spec!r}: {err}."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"--controlnext-config must be a JSON object of config fields, got {type(value).__name__}.")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training option to ``parser`` (shared by ``controlnext train`` and ``python -m controlnext.train``)."""
    return add_config_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_train_arguments` options."""
    return config_from_namespace(TrainConfig, args)


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``python -m controlnext.train`` options (``sys.argv`` by default) into a :class:`TrainConfig`."""
    import os
    import shlex
    import sys

    parser = argparse.ArgumentParser(
        prog="controlnext.train", description="Train a ControlNeXt control module (SD1.5 or SDXL) with accelerate."
    )
    add_train_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_from_args(parser.parse_args(argv))
    launcher = "accelerate launch -m" if "LOCAL_RANK" in os.environ else "python -m"
    cfg.command = " ".join([launcher, "controlnext.train", *map(shlex.quote, argv)])
    return cfg
