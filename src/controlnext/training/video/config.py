"""Settings of a video training run: one dataclass and its command-line form."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...families import get_family
from ..config import MAX_RESOLUTION, check_range

__all__ = ["VideoTrainConfig", "add_video_train_arguments", "video_config_from_args"]



@dataclass
class VideoTrainConfig:
    """Everything a video training run needs (defaults follow the published SVD-v2 training)."""

    # model
    pretrained_model: str = ""
    output_dir: str = "controlnext-video"
    unet_weights: str | None = None
    controlnext: str | None = None
    controlnext_variant: str = "svd-v2"
    controlnext_config: str | None = None
    train_unet: list[str] = field(default_factory=lambda: list(get_family("svd").trainable_patterns))
    allow_pickle: bool = False
    # data
    dataset: str = ""
    width: int = 512
    height: int = 768
    num_frames: int = 14
    sample_stride: int = 2
    dataloader_num_workers: int = 0
    # conditioning (SVD micro-conditioning and guidance dropout)
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    conditioning_dropout_prob: float = 0.1
    noise_distribution: str = "cosine_interpolated"
    # optimisation
    seed: int = 0
    train_batch_size: int = 1
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-5
    control_learning_rate: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    # checkpoints and outputs
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    save_unet: str = "values"
    probe_loss: bool = True

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
        check_range("control_learning_rate", self.control_learning_rate, 0, 1)
        if not self.learning_rate and not self.control_learning_rate:
            raise ValueError("learning_rate (or control_learning_rate) must be > 0.")
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
        if self.save_unet not in ("values", "deltas"):
            raise ValueError("save_unet must be 'values' or 'deltas'.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("mixed_precision must be 'no', 'fp16' or 'bf16'.")
        if self.controlnext_variant not in ("svd-v2", "svd"):
            raise ValueError("controlnext_variant must be 'svd-v2' or 'svd'.")
        self.control_overrides()

    def control_overrides(self) -> dict:
        """Config overrides for a new control module: None, 'tiny', inline JSON or a JSON file."""
        spec = self.controlnext_config
        if not spec:
            return {}
        if spec == "tiny":
            from ...testing import TINY_CONTROLNEXT

            return dict(TINY_CONTROLNEXT)
        text = Path(spec).read_text() if Path(spec).is_file() else spec
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"controlnext_config is neither 'tiny', a JSON file nor inline JSON: {err}") from None
        if not isinstance(value, dict):
            raise ValueError("controlnext_config must be a JSON object of config fields.")
        return value

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
    d = VideoTrainConfig()
    g = parser.add_argument_group("models")
    g.add_argument("--pretrained-model", required=True, help="base SVD folder or hub id (img2vid-xt layout)")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--unet-weights", default=None, help="start from these UNet weights (e.g. the released unet.bin)")
    g.add_argument("--controlnext", default=None, help="start from this control module (file or folder)")
    g.add_argument("--controlnext-variant", default=d.controlnext_variant, choices=["svd-v2", "svd"])
    g.add_argument("--controlnext-config", default=None, help="new module's config overrides: 'tiny' or JSON")
    g.add_argument("--train-unet", nargs="+", default=d.train_unet, metavar="PATTERN",
                   help="regexes of UNet parameters to train; '.*' (default, as published) trains the whole UNet, "
                        "'to_out to_v' the attention projections only, 'none' only the control module")  # fmt: skip
    g.add_argument("--allow-pickle", action="store_true", help="unpickle non-tensor .bin files (trusted only)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="folder of clip folders (video + pose, see docs/video.md)")
    g.add_argument("--width", type=int, default=d.width)
    g.add_argument("--height", type=int, default=d.height)
    g.add_argument("--num-frames", type=int, default=d.num_frames)
    g.add_argument("--sample-stride", type=int, default=d.sample_stride)
    g.add_argument("--dataloader-num-workers", type=int, default=d.dataloader_num_workers)
    g = parser.add_argument_group("conditioning")
    g.add_argument("--fps", type=int, default=d.fps)
    g.add_argument("--motion-bucket-id", type=int, default=d.motion_bucket_id)
    g.add_argument("--noise-aug-strength", type=float, default=d.noise_aug_strength)
    g.add_argument("--conditioning-dropout-prob", type=float, default=d.conditioning_dropout_prob)
    g.add_argument("--noise-distribution", default=d.noise_distribution, choices=["cosine_interpolated", "lognormal"])
    g = parser.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    g.add_argument("--num-train-epochs", type=int, default=d.num_train_epochs)
    g.add_argument("--max-train-steps", type=int, default=None)
    g.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate)
    g.add_argument("--control-learning-rate", type=float, default=None, help="default: --learning-rate")
    g.add_argument("--lr-scheduler", default=d.lr_scheduler)
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=None)
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=["no", "fp16", "bf16"])
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints-total-limit", type=int, default=None)
    g.add_argument("--resume-from-checkpoint", default=None, help="'latest', a checkpoint-N folder or a run folder")
    g.add_argument("--save-unet", default=d.save_unet, choices=["values", "deltas"])
    return parser


def video_config_from_args(args: argparse.Namespace) -> VideoTrainConfig:
    names = {f.name for f in dataclasses.fields(VideoTrainConfig)}
    return VideoTrainConfig(**{k: v for k, v in vars(args).items() if k in names})
