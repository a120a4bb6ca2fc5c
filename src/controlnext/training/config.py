"""Training settings: one dataclass, its command-line form, and the published per-family defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..families import families, get_family

__all__ = [
    "MAX_RESOLUTION",
    "TrainConfig",
    "add_train_arguments",
    "check_range",
    "config_from_args",
    "parse_train_args",
]

# The largest training side accepted: beyond it one sample does not fit any current accelerator.
MAX_RESOLUTION = 4096


def _image_families() -> list[str]:
    """The families ``controlnext train`` takes: the image UNets (the video family has ``train-video``; the
    transformer families sd3 and flux have no training yet)."""
    return [f.name for f in families() if not f.video and f.denoiser == "unet"]


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
    """Everything a training run needs. ``None`` fields take the base model family's published default."""

    # model
    pretrained_model: str = ""
    output_dir: str = "controlnext-model"
    family: str = "auto"
    revision: str | None = None
    base_variant: str | None = None
    pretrained_vae: str | None = None
    controlnext: str | None = None
    controlnext_variant: str | None = None
    controlnext_config: str | None = None
    control_injection: str = "cross_norm"
    train_unet: list[str] | None = None
    # data
    dataset: str = ""
    dataset_config: str | None = None
    dataset_split: str = "train"
    cache_dir: str | None = None
    image_column: str = "image"
    condition_column: str = "conditioning_image"
    caption_column: str = "text"
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    bucketing: bool = False
    bucket_step: int = 64
    caption_dropout: float = 0.0
    on_bad_row: str = "skip"
    check_data: bool = True
    max_train_samples: int | None = None
    dataloader_num_workers: int = 0
    # optimisation
    seed: int = 0
    train_batch_size: int = 4
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    unet_learning_rate: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None
    text_embedding_cache: int = 1024
    cpu_threads: int | None = None
    cpu: bool = False
    # checkpoints and outputs
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    exit_after_steps: int | None = None
    save_unet_as: str = "values"
    # validation and logging
    validation_prompt: list[str] = field(default_factory=list)
    validation_image: list[str] = field(default_factory=list)
    validation_steps: int = 100
    num_validation_images: int = 1
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    report_to: str = "tensorboard"
    tracker_project_name: str = "controlnext"
    logging_steps: int = 1
    # the command line that made this config (for the model card); filled in by the entry points
    command: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting and what is expected."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(bool(self.pretrained_model), "--pretrained-model is required (a diffusers folder or hub id).")
        need(bool(self.dataset), "--dataset is required (a local folder/file or a hub dataset id).")
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
        need(
            self.save_unet_as in ("values", "deltas"),
            f"--save-unet-as must be values or deltas, got {self.save_unet_as!r}.",
        )
        need(
            self.mixed_precision in (None, "no", "fp16", "bf16"),
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

    def control_overrides(self) -> dict:
        """``--controlnext-config``: 'tiny', inline JSON, or a JSON file of ControlNeXtModel config overrides."""
        spec = self.controlnext_config
        if not spec:
            return {}
        if spec == "tiny":
            from ..testing import TINY_CONTROLNEXT, TINY_CONTROLNEXT_SD15

            return dict(TINY_CONTROLNEXT_SD15 if self.controlnext_variant == "sd15" else TINY_CONTROLNEXT)
        text = Path(spec).read_text() if Path(spec).is_file() else spec
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--controlnext-config must be 'tiny', a JSON object or a JSON file; could not parse {spec!r}: {err}."
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"--controlnext-config must be a JSON object of config fields, got {type(value).__name__}."
            )
        return value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bool_flag(parser, name: str, default: bool, help: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training option to ``parser`` (shared by ``controlnext train`` and ``python -m controlnext.train``)."""
    d = TrainConfig()
    g = parser.add_argument_group("base model and control module")
    g.add_argument(
        "--pretrained-model",
        "--pretrained-model-name-or-path",
        dest="pretrained_model",
        required=True,
        help="Base model: a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or hub id.",
    )
    g.add_argument(
        "--family", default=d.family, choices=["auto", *_image_families()], help="Base model family (default: detected)"
    )
    g.add_argument("--revision", default=None, help="Hub revision of the base model.")
    g.add_argument("--base-variant", default=None, help="Hub file variant of the base model weights (e.g. fp16).")
    g.add_argument("--pretrained-vae", default=None, help="A different VAE (e.g. an fp16-safe SDXL VAE).")
    g.add_argument(
        "--controlnext", default=None, help="Start from this control module (folder, file or hub id) instead of random."
    )
    g.add_argument(
        "--controlnext-variant",
        default=None,
        choices=[v for name in _image_families() for v in get_family(name).variants],
        help="Layout of a new control module (default: the family's, sd15-training for SD1.5, sdxl for SDXL).",
    )
    g.add_argument(
        "--controlnext-config",
        default=None,
        help="Overrides of the new module's config: 'tiny', inline JSON or a JSON file (e.g. channel counts).",
    )
    g.add_argument(
        "--control-injection",
        default=d.control_injection,
        choices=["cross_norm", "zero_conv"],
        help="cross_norm (ControlNeXt) or zero_conv (the paper's ablation: zero-initialised 1x1 conv).",
    )
    g.add_argument(
        "--train-unet",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="Regexes (re.search) of UNet parameter names to train; 'none' trains the control module only. "
        "Default: 'to_out' for SD1.5, '.*attn2.*to_out.*' for SDXL (as published).",
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        "--dataset-name",
        "--train-data-dir",
        dest="dataset",
        required=True,
        help="imagefolder with metadata.jsonl/csv, saved dataset, .parquet file/folder, or hub dataset id.",
    )
    g.add_argument("--dataset-config", default=None, help="Hub dataset configuration name.")
    g.add_argument("--dataset-split", default=d.dataset_split)
    g.add_argument("--cache-dir", default=None, help="Cache folder for hub datasets.")
    g.add_argument("--image-column", default=d.image_column)
    g.add_argument(
        "--condition-column", "--conditioning-image-column", dest="condition_column", default=d.condition_column
    )
    g.add_argument("--caption-column", default=d.caption_column)
    g.add_argument("--resolution", type=int, default=None, help="Training size (default 512 SD1.5, 1024 SDXL).")
    _bool_flag(g, "--center-crop", d.center_crop, "Center crop instead of random crop.")
    _bool_flag(g, "--random-flip", d.random_flip, "Flip image and condition together with probability 0.5.")
    _bool_flag(g, "--bucketing", d.bucketing, "Group images into aspect-ratio buckets of about resolution² pixels.")
    g.add_argument("--bucket-step", type=int, default=d.bucket_step, help="Bucket sides are multiples of this.")
    g.add_argument(
        "--caption-dropout",
        "--proportion-empty-prompts",
        dest="caption_dropout",
        type=float,
        default=d.caption_dropout,
        help="Probability of an empty caption (for classifier-free guidance).",
    )
    g.add_argument(
        "--on-bad-row",
        default=d.on_bad_row,
        choices=["skip", "error"],
        help="Skip bad rows (reported and counted) or stop at the first one.",
    )
    _bool_flag(g, "--check-data", d.check_data, "Check every row's files and sizes before training.")
    g.add_argument("--max-train-samples", type=int, default=None, help="Use only the first N rows (debugging).")
    g.add_argument("--dataloader-num-workers", type=int, default=d.dataloader_num_workers)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="Batch size per device.")
    g.add_argument("--num-train-epochs", type=int, default=d.num_train_epochs)
    g.add_argument("--max-train-steps", type=int, default=None, help="Optimisation steps (overrides epochs).")
    g.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    _bool_flag(g, "--gradient-checkpointing", d.gradient_checkpointing, "Trade compute for memory.")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="Control module learning rate.")
    g.add_argument("--unet-learning-rate", type=float, default=d.unet_learning_rate, help="UNet subset learning rate.")
    _bool_flag(g, "--scale-lr", d.scale_lr, "Multiply learning rates by batch size x accumulation x processes.")
    g.add_argument(
        "--lr-scheduler",
        default=d.lr_scheduler,
        choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
    )
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--lr-num-cycles", type=int, default=d.lr_num_cycles)
    g.add_argument("--lr-power", type=float, default=d.lr_power)
    _bool_flag(g, "--use-8bit-adam", d.use_8bit_adam, "8-bit AdamW from bitsandbytes (must be installed).")
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument(
        "--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="Default: accelerate's configuration."
    )
    _bool_flag(g, "--allow-tf32", d.allow_tf32, "Allow TF32 matmuls on Ampere+ GPUs.")
    _bool_flag(g, "--use-ema", d.use_ema, "Keep an EMA of the trained weights (exported instead of the raw weights).")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is typical).")
    g.add_argument("--noise-offset", type=float, default=d.noise_offset)
    g.add_argument(
        "--prediction-type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Default: the base model scheduler's.",
    )
    _bool_flag(g, "--cpu", d.cpu, "Train on the CPU even if a GPU is present (also chosen when none is).")
    g.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: torch's choice; 1 is best on a shared machine).",
    )
    g.add_argument(
        "--text-embedding-cache",
        type=int,
        default=d.text_embedding_cache,
        help="Captions whose embeddings are kept (0: encode every batch).",
    )

    g = parser.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints-total-limit", type=int, default=None)
    g.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="'latest' (in --output-dir; starts fresh if there is none) or a checkpoint folder.",
    )
    g.add_argument(
        "--exit-after-steps",
        type=int,
        default=None,
        help="Stop after this many steps in this invocation (checkpoint written; resume with "
        "--resume-from-checkpoint latest), e.g. for time-limited cluster jobs.",
    )
    g.add_argument(
        "--save-unet-as",
        default=d.save_unet_as,
        choices=["values", "deltas"],
        help="Save the trained UNet parameters as values or as deltas from the base.",
    )
    g.add_argument("--validation-prompt", nargs="+", default=[])
    g.add_argument("--validation-image", nargs="+", default=[])
    g.add_argument("--validation-steps", type=int, default=d.validation_steps)
    g.add_argument("--num-validation-images", type=int, default=d.num_validation_images)
    g.add_argument("--validation-inference-steps", type=int, default=d.validation_inference_steps)
    g.add_argument("--validation-guidance-scale", type=float, default=d.validation_guidance_scale)
    g.add_argument("--report-to", default=d.report_to, choices=["none", "tensorboard", "wandb", "all"])
    g.add_argument("--tracker-project-name", default=d.tracker_project_name)
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_train_arguments` options."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


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
