"""Command-line options declared once, on the fields of a config dataclass.

A field made with :func:`option` carries its command-line form (help, choices, group, spellings) in its metadata;
:func:`add_config_arguments` generates the argparse options of a config class from them and
:func:`config_from_namespace` builds the config from what was parsed. Options that are not given keep the
dataclass default (argparse stores nothing for them), so the dataclass is the one place a default is written, and
``--help`` shows it.

Old spellings stay accepted as hidden aliases for a release: each use prints one line naming the new flag.
Options shared by ``controlnext train`` and ``controlnext train-video`` are declared once, in :data:`SHARED`, so
they have the same name and meaning in both.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

__all__ = [
    "GROUPS",
    "Option",
    "SHARED",
    "add_config_arguments",
    "config_from_namespace",
    "default_mixed_precision",
    "format_default",
    "given_as",
    "option",
    "shared",
]

# --help sections, in this order (a section without options is not shown)
GROUPS = ("base model and control module", "data", "conditioning", "optimisation", "checkpoints and outputs",
          "validation and logging")  # fmt: skip
MODEL, DATA, CONDITIONING, OPTIMISATION, OUTPUTS, VALIDATION = GROUPS
_SPELLINGS = "spellings:"  # namespace attribute "spellings:<field>": the flags an option with old spellings came as


class _Store(argparse._StoreAction):
    """Store the value and remember the spelling used, so that an old one can be reported."""

    def __init__(self, *args: Any, deprecated: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.deprecated = deprecated

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        used = getattr(namespace, _SPELLINGS + self.dest, [])
        setattr(namespace, _SPELLINGS + self.dest, [*used, option_string])


class _HelpFormatter(argparse.HelpFormatter):
    """Leaves old spellings out of --help."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "deprecated", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


@dataclass(frozen=True)
class Option:
    """The command-line form of one config field."""

    help: str
    group: str = "options"
    flags: tuple[str, ...] = ()  # spellings shown in --help; default: --field-name
    deprecated: tuple[str, ...] = ()  # hidden old spellings, still accepted with one deprecation line
    note: str = ""  # appended to the deprecation line (e.g. what changed in meaning)
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None  # a callable is asked when the parser is made
    nargs: str | None = None
    metavar: str | None = None
    required: bool = False
    default_text: str | None = None  # the default as --help shows it, when the field's value would not say it


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A dataclass field with a command-line form (the keyword arguments of :class:`Option`)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": Option(**cli)})


def default_mixed_precision() -> str:
    """``no``, or what ``accelerate launch`` was configured with (it passes it on in the environment)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


# Options with the same name and meaning in `train` and `train-video` (each config chooses its default).
SHARED: dict[str, dict[str, Any]] = {
    "pretrained_model": dict(
        help="Base model: a diffusers folder or a hub id ('owner/name').",
        flags=("--model",),
        deprecated=("--pretrained-model",),
        required=True,
        group=MODEL,
    ),
    "output_dir": dict(help="Folder for the outputs, checkpoints and logs.", group=OUTPUTS),
    "seed": dict(help="Seed of the data order, noise and new weights.", group=OPTIMISATION),
    "train_batch_size": dict(help="Batch size per device.", group=OPTIMISATION),
    "num_train_epochs": dict(help="Passes over the data (unless --max-train-steps is given).", group=OPTIMISATION),
    "max_train_steps": dict(
        help="Optimisation steps; overrides --num-train-epochs.", default_text="from the epochs", group=OPTIMISATION
    ),
    "gradient_accumulation_steps": dict(help="Batches summed into one optimisation step.", group=OPTIMISATION),
    "gradient_checkpointing": dict(
        help="Recompute activations in the backward pass: less memory, more time.", group=OPTIMISATION
    ),  # fmt: skip
    "learning_rate": dict(help="Learning rate of the control module.", group=OPTIMISATION),
    "unet_learning_rate": dict(help="Learning rate of the trained UNet parameters (--train-unet).", group=OPTIMISATION),
    "lr_scheduler": dict(
        help="Learning-rate schedule.",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        group=OPTIMISATION,
    ),
    "lr_warmup_steps": dict(
        help="Steps of linear warm-up (for the *_with_warmup and decaying schedules).", group=OPTIMISATION
    ),  # fmt: skip
    "adam_beta1": dict(help="AdamW beta1.", group=OPTIMISATION),
    "adam_beta2": dict(help="AdamW beta2.", group=OPTIMISATION),
    "adam_weight_decay": dict(help="AdamW weight decay.", group=OPTIMISATION),
    "adam_epsilon": dict(help="AdamW epsilon.", group=OPTIMISATION),
    "max_grad_norm": dict(help="Clip the gradient norm to this (0: no clipping).", group=OPTIMISATION),
    "mixed_precision": dict(
        help="Compute precision (the trained weights stay float32).",
        choices=("no", "fp16", "bf16"),
        default_text="no, or the value accelerate launch was configured with",
        group=OPTIMISATION,
    ),
    "dataloader_num_workers": dict(
        help="Data loading worker processes (0: in the training process).", group=DATA
    ),  # fmt: skip
    "train_unet": dict(nargs="+", metavar="PATTERN", group=MODEL),
    "controlnext": dict(
        help="Start from this control module (folder, file or hub id).",
        default_text="a new, randomly initialised module",
        group=MODEL,
    ),
    "controlnext_config": dict(
        help="Config overrides of a new module: 'tiny', inline JSON or a JSON file (e.g. channel counts).",
        default_text="the variant's published config",
        group=MODEL,
    ),
    "checkpointing_steps": dict(help="Write a checkpoint every N steps.", group=OUTPUTS),
    "checkpoints_total_limit": dict(help="Keep only the newest N checkpoints.", default_text="keep all", group=OUTPUTS),
    "resume_from_checkpoint": dict(
        help="'latest' (in --output-dir; starts fresh if there is none) or a checkpoint folder.",
        default_text="start a new run",
        group=OUTPUTS,
    ),
    "allow_changed_settings": dict(
        help="Resume even if settings that decide the data order (seed, batch size, accumulation, processes, data "
        "size) differ from the checkpoint's: a warning instead of an error.",
        group=OUTPUTS,
    ),
    "save_unet_as": dict(
        help="Save the trained UNet parameters as their values or as deltas from the base model.",
        choices=("values", "deltas"),
        group=OUTPUTS,
    ),
    "attention_backend": dict(
        help="UNet attention: sdpa (torch's scaled_dot_product_attention), xformers, npu-flash (Ascend) or eager "
        "(plain matmul-softmax).",
        choices=("sdpa", "xformers", "npu-flash", "eager"),  # = controlnext.attention.ATTENTION_BACKENDS
        group=OPTIMISATION,
    ),
    "push_to_hub": dict(
        help="Upload the outputs (module, UNet weights, model card; not the checkpoints) to a hub model repository "
        "when training ends; the hub and a token are checked before training starts.",
        group=OUTPUTS,
    ),
    "hub_model_id": dict(
        help="Repository for --push-to-hub ('owner/name' or 'name').", default_text="the output folder's name",
        group=OUTPUTS,
    ),
}


def shared(name: str, default: Any = MISSING, *, default_factory: Any = MISSING, **overrides: Any) -> Any:
    """The field of the shared option ``name`` (see :data:`SHARED`) with this config's default and overrides."""
    return option(default, default_factory=default_factory, **{**SHARED[name], **overrides})


def format_default(value: Any) -> str:
    """A default as ``--help`` shows it: ``1e-4``, ``0.9``, ``on``/``off``, ``a b`` ("" when there is none)."""
    if value is None or value == [] or value == "":
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            mantissa, exponent = f"{value:.12e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.12g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _kind(annotation: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _flags(name: str, opt: Option) -> tuple[str, ...]:
    return opt.flags or (f"--{name.replace('_', '-')}",)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one option per field of dataclass ``cls`` made with :func:`option`, in groups, in field order."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in dataclasses.fields(cls)}  # fmt: skip
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(cls):
        opt: Option | None = f.metadata.get("cli")
        if opt is None:
            continue
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        group = groups[opt.group]
        element, is_list = _kind(hints[f.name])
        flags = _flags(f.name, opt)
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS)
        if element is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = element
            choices = opt.choices() if callable(opt.choices) else opt.choices
            if choices is not None:
                kw["choices"] = list(choices)
            kw["metavar"] = opt.metavar or (None if choices is not None else flags[0][2:].upper().replace("-", "_"))
            if opt.nargs or is_list:
                kw["nargs"] = opt.nargs or "+"
        shown = opt.default_text if opt.default_text is not None else format_default(defaults[f.name])
        text = f"{opt.help} (default: {shown})" if shown else opt.help
        if opt.deprecated:
            kw.update(action=_Store, deprecated=opt.deprecated)
        group.add_argument(
            *flags, *opt.deprecated, dest=f.name, required=opt.required, help=text.replace("%", "%%"), **kw
        )
    if any(getattr(a, "deprecated", ()) for a in parser._actions):
        parser.formatter_class = _HelpFormatter
    return parser


def given_as(args: argparse.Namespace, name: str) -> list[str]:
    """The spellings option ``name`` was given as (recorded for the options that have old spellings)."""
    return list(getattr(args, _SPELLINGS + name, []))


def config_from_namespace(cls: type, args: argparse.Namespace) -> Any:
    """The ``cls`` config of options parsed by :func:`add_config_arguments` (the rest keep their defaults).

    An old spelling prints one deprecation line; an old and a new spelling of one option together are an error.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = vars(args)
    for key, spellings in given.items():
        if not key.startswith(_SPELLINGS):
            continue
        name = key[len(_SPELLINGS) :]
        opt: Option = fields[name].metadata["cli"]
        new, note = _flags(name, opt)[0], f" {opt.note}" if opt.note else ""
        old = [s for s in spellings if s in opt.deprecated]
        if old and len(old) < len(spellings):
            raise ValueError(f"{old[0]} is the old spelling of {new}: give only {new}.{note}")
        if old:
            print(f"warning: {old[0]} is deprecated, use {new}.{note}", file=sys.stderr)
    return cls(**{k: v for k, v in given.items() if k in fields})
