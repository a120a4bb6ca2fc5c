"""Settings of a video training run: one dataclass and its command-line form."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from ...families import get_family
from ...sources import is_local_path, require_model_source
from ..config import MAX_RESOLUTION, check_range
from ..options import (
    CONDITIONING,
    DATA,
    MODEL,
    OPTIMISATION,
    add_config_arguments,
    config_from_namespace,
    default_mixed_precision,
    given_as,
    option,
    shared,
)

__all__ = ["VideoTrainConfig", "add_video_train_arguments", "video_config_from_args"]


@dataclass
class VideoTrainConfig:
    """Everything a video training run needs (defaults follow the published SVD-v2 training).

    Each field's command-line form (``controlnext train-video --help``) is declared with it; see
    :mod:`controlnext.training.options`. The options shared with ``controlnext train`` have its names and meanings.
    """

    # model
    pretrained_model: str = shared("pretrained_model", "", help="Base SVD model: a folder or a hub id "
                                   "(the img2vid-xt layout).")  # fmt: skip
    output_dir: str = shared("output_dir", "controlnext-video")
    unet_weights: str | None = option(
        None,
        help="Start from these UNet weights (e.g. the released unet.bin).",
        default_text="the base model's UNet",
        group=MODEL,
    )
    controlnext: str | None = shared("controlnext", None)
    controlnext_variant: str = option(
        "svd-v2", help="Layout of a new control module.", choices=("svd-v2", "svd"), group=MODEL
    )
    controlnext_config: str | None = shared("controlnext_config", None)
    train_unet: list[str] = shared(
        "train_unet",
        default_factory=lambda: list(get_family("svd").trainable_patterns),
        help="Regexes (re.search) of UNet parameter names to train; '.*' (as published) trains the whole UNet, "
        "'to_out to_v' the attention projections only, 'none' only the control module.",
    )
    allow_pickle: bool = option(False, help="Unpickle non-tensor .bin files (trusted files only).", group=MODEL)
    # data
    dataset: str = option(
        "", help="Folder of clip folders (video + pose, see docs/video.md).", required=True, group=DATA
    )
    width: int = option(512, help="Frame width in pixels (a multiple of 8).", group=DATA)
    height: int = option(768, help="Frame height in pixels (a multiple of 8).", group=DATA)
    num_frames: int = option(14, help="Frames per training clip.", group=DATA)
    sample_stride: int = option(2, help="Take every N-th frame of a clip.", group=DATA)
    dataloader_num_workers: int = shared("dataloader_num_workers", 0)
    # conditioning (SVD micro-conditioning and guidance dropout)
    fps: int = option(7, help="SVD fps micro-conditioning.", group=CONDITIONING)
    motion_bucket_id: int = option(127, help="SVD motion bucket micro-conditioning.", group=CONDITIONING)
    noise_aug_strength: float = option(0.02, help="Noise added to the reference image latents.", group=CONDITIONING)
    conditioning_dropout_prob: float = option(
        0.1,
        help="Probability of dropping the reference image, the pose, or both (each; at most 1/3).",
        group=CONDITIONING,
    )
    noise_distribution: str = option(
        "cosine_interpolated",
        help="Distribution of the training noise levels.",
        choices=("cosine_interpolated", "lognormal"),
        group=CONDITIONING,
    )
    # optimisation
    seed: int = shared("seed", 0)
    train_batch_size: int = shared("train_batch_size", 1)
    num_train_epochs: int = shared("num_train_epochs", 1)
    max_train_steps: int | None = shared("max_train_steps", None)
    gradient_accumulation_steps: int = shared("gradient_accumulation_steps", 1)
    gradient_checkpointing: bool = shared("gradient_checkpointing", False)
    learning_rate: float = shared(
        "learning_rate",
        1e-5,
        deprecated=("--control-learning-rate",),
        note="--learning-rate is the control module's rate and --unet-learning-rate the UNet's (as in "
        "`controlnext train`); before, train-video's --learning-rate was the UNet's.",
    )
    unet_learning_rate: float = shared("unet_learning_rate", 1e-5)
    lr_scheduler: str = shared("lr_scheduler", "constant")
    lr_warmup_steps: int = shared("lr_warmup_steps", 0)
    adam_beta1: float = shared("adam_beta1", 0.9)
    adam_beta2: float = shared("adam_beta2", 0.999)
    adam_weight_decay: float = shared("adam_weight_decay", 1e-2)
    adam_epsilon: float = shared("adam_epsilon", 1e-8)
    max_grad_norm: float = shared("max_grad_norm", 1.0)
    mixed_precision: str = shared("mixed_precision", default_factory=default_mixed_precision)
    attention_backend: str = shared("attention_backend", "sdpa")
    # checkpoints and outputs
    checkpointing_steps: int | None = shared("checkpointing_steps", 500)
    checkpoints_total_limit: int | None = shared("checkpoints_total_limit", None)
    resume_from_checkpoint: str | None = shared(
        "resume_from_checkpoint", None, help="'latest' (in --output-dir), a checkpoint-N folder or a run folder."
    )
    allow_changed_settings: bool = shared("allow_changed_settings", False)
    save_unet_as: str = shared("save_unet_as", "values", deprecated=("--save-unet",))
    push_to_hub: bool = shared("push_to_hub", False)
    hub_model_id: str | None = shared("hub_model_id", None)
    probe_loss: bool = option(
        True,
        help="Measure the loss of one fixed batch before and after training (a learning check).",
        group=OPTIMISATION,
    )

    def validate(self) -> None:
        if not self.pretrained_model:
            raise ValueError("pretrained_model (the base SVD folder or hub id) is required.")
        if not self.dataset:
            raise ValueError("dataset (a folder of clip folders, see docs/video.md) is required.")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}.")
            if v > MAX_RESOLUTION:
                raise ValueError(f"{name} must be at most {MAX_RESOLUTION}, got {v} (SVD trains at 512x768).")
        positive = ("num_frames", "sample_stride", "train_batch_size", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {self.max_train_steps}.")
        # Non-finite or huge rates train to all-NaN weights (Adam steps are about lr in size).
        check_range("learning_rate", self.learning_rate, 0, 1)
        check_range("unet_learning_rate", self.unet_learning_rate, 0, 1)
        if not self.learning_rate:
            raise ValueError("learning_rate (the control module's) must be > 0.")
        check_range("adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        check_range("adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        check_range("adam_weight_decay", self.adam_weight_decay, 0, 1)
        check_range("adam_epsilon", self.adam_epsilon, 0, 1, low_open=True)
        check_range("max_grad_norm", self.max_grad_norm, 0, 1e6)
        check_range("noise_aug_strength", self.noise_aug_strength, 0, 10)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        if not 0 <= self.conditioning_dropout_prob <= 1 / 3:
            raise ValueError("conditioning_dropout_prob must lie in [0, 1/3] (three disjoint drop events).")
        if self.noise_distribution not in ("cosine_interpolated", "lognormal"):
            raise ValueError("noise_distribution must be 'cosine_interpolated' or 'lognormal'.")
        if self.save_unet_as not in ("values", "deltas"):
            raise ValueError("save_unet_as must be 'values' or 'deltas'.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("mixed_precision must be 'no', 'fp16' or 'bf16'.")
        if self.controlnext_variant not in ("svd-v2", "svd"):
            raise ValueError("controlnext_variant must be 'svd-v2' or 'svd'.")
        self.control_overrides()

    def control_overrides(self) -> dict:
        """``--controlnext-config`` as config overrides for a new control module ('tiny' keeps the variant's
        structure)."""
        from ..config import parse_control_overrides

        return parse_control_overrides(self.controlnext_config, self.controlnext_variant)

    def resume_key(self, num_processes: int) -> dict:
        """Settings that decide which samples a step reads; a checkpoint resumes only under the same ones."""
        return dict(
            seed=self.seed, train_batch_size=self.train_batch_size, num_processes=num_processes,
            gradient_accumulation_steps=self.gradient_accumulation_steps, num_frames=self.num_frames,
            sample_stride=self.sample_stride, width=self.width, height=self.height,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_video_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every video training option to ``parser``."""
    return add_config_arguments(parser, VideoTrainConfig)


def video_config_from_args(args: argparse.Namespace) -> VideoTrainConfig:
    """The :class:`VideoTrainConfig` of parsed :func:`add_video_train_arguments` options."""
    cfg = config_from_namespace(VideoTrainConfig, args)
    if is_local_path(cfg.pretrained_model):  # a mistyped path is named here, not sent to the hub
        require_model_source(cfg.pretrained_model, "--model")
    # train-video's --learning-rate used to be the UNet's rate: say so when it now leaves the UNet at another rate
    # (vars(args) holds only the options that were given; see add_config_arguments).
    new_spelling = "--learning-rate" in given_as(args, "learning_rate")
    if new_spelling and "unet_learning_rate" not in vars(args) and cfg.train_unet != ["none"]:
        if cfg.learning_rate != cfg.unet_learning_rate:
            print(
                f"note: --learning-rate {cfg.learning_rate:g} is the control module's rate; the UNet trains at "
                f"--unet-learning-rate {cfg.unet_learning_rate:g} (before, train-video's --learning-rate was the "
                "UNet's): pass --unet-learning-rate to set it.",
                file=sys.stderr,
            )
    return cfg
