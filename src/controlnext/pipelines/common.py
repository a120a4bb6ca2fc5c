"""What every ControlNeXt pipeline adds to its stock diffusers parent: a `controlnext` component and control inputs.

The pipelines are thin subclasses: `__call__` prepares the conditions, attaches the module(s) to the UNet with
:func:`controlnext.attach` for the duration of the stock `__call__`, and detaches afterwards (also on error), so the
stock denoising loop, schedulers, callbacks, LoRA, offloading and output types work unchanged.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..conditioning import load_condition
from ..families import detect_family
from ..inject import ControlNeXtAdapter, attached
from ..models.controlnext import ControlNeXtModel

# Bounds of the control inputs (beyond them the control swamps the UNet's features, or overflows in half precision).
MAX_CONTROL_SCALE = 10.0
MAX_GUIDANCE_SCALE = 100.0
# The output size follows the condition's unless height/width are given; a bigger condition needs them given.
MAX_DEFAULT_SIDE = 2048
# StableDiffusion(XL)Pipeline.check_inputs requires height and width divisible by 8, whatever the VAE factor.
STOCK_SIZE_MULTIPLE = 8
# model_index.json names the class as [LOADER_MODULE, class name] next to a LOADER_MODULE.py that imports it from
# controlnext: the way diffusers finds a pipeline class that is not part of diffusers.
LOADER_MODULE = "controlnext_pipeline"


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float; a ValueError naming ``name`` unless it is a finite number in [``low``, ``high``]."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}.")
    return number


class MultiControlNeXtModel(ModelMixin, ConfigMixin):
    """Several ControlNeXt modules used together (their controls are summed).

    Saved as one diffusers model folder: ``config.json`` lists each module's config and the weights file holds
    ``nets.0.*``, ``nets.1.*``, ..., so ``safe_serialization``, ``variant``, sharding and every ``from_pretrained``
    argument (``torch_dtype``, ``device_map``, ...) work as for any diffusers model.
    """

    def __init__(
        self, modules: Sequence[ControlNeXtModel] | None = None, module_configs: Sequence[dict] | None = None
    ):
        super().__init__()
        if modules is None:  # from_pretrained / from_config: build the modules from their configs
            modules = [ControlNeXtModel.from_config(c) for c in module_configs or ()]
        modules = list(modules)
        if not modules:
            raise ValueError("A MultiControlNeXtModel needs at least one ControlNeXtModel.")
        self.nets = nn.ModuleList(modules)
        configs = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in modules]
        self.register_to_config(module_configs=configs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MultiControlNeXtModel:
        """Load a saved MultiControlNeXtModel (every argument of ``ModelMixin.from_pretrained`` applies).

        Folders of the earlier layout (one ``module_N`` sub-folder per module, no ``config.json``) load too, each
        module with the same arguments.
        """
        root = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        legacy = [p for p in root.glob("module_*") if p.is_dir() and p.name[7:].isdigit()]
        legacy.sort(key=lambda p: int(p.name[7:]))
        if legacy and not (root / cls.config_name).is_file():
            kwargs.pop("subfolder", None)
            return cls([ControlNeXtModel.from_pretrained(str(p), **kwargs) for p in legacy])
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _as_component(controlnext: Any) -> ModelMixin | None:
    if controlnext is None or isinstance(controlnext, (ControlNeXtModel, MultiControlNeXtModel)):
        return controlnext
    if isinstance(controlnext, (list, tuple)):
        mods = list(controlnext)
        if not all(isinstance(m, ControlNeXtModel) for m in mods):
            raise TypeError("controlnext must be a ControlNeXtModel or a list of them.")
        return mods[0] if len(mods) == 1 else MultiControlNeXtModel(mods)
    raise TypeError(f"controlnext must be a ControlNeXtModel or a list of them, not {type(controlnext).__name__}.")


def _per_module(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} has {len(value)} entries but {n} ControlNeXt module(s) are loaded; give one each."
            )
        return list(value)
    return [value] * n


class _LiveRun:
    """The pipeline's own guidance and schedule length, read at each backbone call (both are set inside the stock
    call). Guidance counts only for families whose pipelines batch [unconditional, conditional] halves (not Flux,
    whose true CFG makes a separate call per half)."""

    def __init__(self, pipe: Any):
        self._pipe = pipe
        self._cfg_batch = detect_family(pipe).cfg_batch

    @property
    def guidance(self) -> bool:
        return self._cfg_batch and bool(self._pipe.do_classifier_free_guidance)

    @property
    def num_steps(self) -> int:
        return getattr(self._pipe, "_num_timesteps", None) or 1


def _prompt_batch(call: dict) -> int | None:
    """The number of prompts of a stock call (None when it cannot be told, e.g. no prompt and no embeddings)."""
    prompt, embeds = call.get("prompt"), call.get("prompt_embeds")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    return embeds.shape[0] if isinstance(embeds, torch.Tensor) else None


class ControlNeXtPipelineMixin:
    """Mixed into a stock diffusers pipeline class (placed before it in the bases); see :func:`with_controlnext`."""

    controlnext: ModelMixin | None
    # The small control module stays on the execution device under `enable_model_cpu_offload`: it runs inside the
    # UNet call at every step, so offloading it would move it back and forth each step.
    _exclude_from_cpu_offload = ["controlnext"]

    def __init__(self, *args: Any, controlnext: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_modules(controlnext=_as_component(controlnext))

    # ------------------------------------------------------------------ saving and loading
    def to_json_string(self) -> str:
        """model_index.json names the class as ``[LOADER_MODULE, class]``: see :meth:`save_config`."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [LOADER_MODULE, type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Write model_index.json and ``controlnext_pipeline.py``, which imports this class from controlnext.

        With both, ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the folder as this
        class (diffusers' rule for pipelines that live outside diffusers); this class's own ``from_pretrained``
        needs no remote code.
        """
        super().save_config(save_directory, *args, **kwargs)
        cls = type(self)
        (Path(save_directory) / f"{LOADER_MODULE}.py").write_text(
            f'"""The pipeline class of this folder; it is part of the controlnext package (not of diffusers).\n\n'
            f"Load the folder with `{cls.__name__}.from_pretrained(folder)` (from {cls.__module__}), or with\n"
            f'`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, which runs this file.\n"""\n\n'
            f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n"
        )

    @classmethod
    def _dict_from_json_file(cls, json_file: str | Path) -> dict:
        """Read a config file; a ControlNeXt folder's ``[LOADER_MODULE, class]`` reads as the class itself, so that
        loading through this class (from a folder or the hub) never runs the folder's loader file."""
        config = super()._dict_from_json_file(json_file)
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[0] == LOADER_MODULE:
            config["_class_name"] = name[1]
        return config

    # ------------------------------------------------------------------ modules
    @property
    def backbone(self) -> nn.Module:
        """The denoiser the control is injected into (the family's component: ``unet`` or ``transformer``)."""
        return getattr(self, detect_family(self).denoiser)

    @property
    def controlnext_modules(self) -> list[ControlNeXtModel]:
        cn = getattr(self, "controlnext", None)
        if cn is None:
            return []
        return list(cn.nets) if isinstance(cn, MultiControlNeXtModel) else [cn]

    def set_controlnext(self, controlnext: Any) -> None:
        """Replace the pipeline's control module(s) (a module, a list, or None)."""
        self.register_modules(controlnext=_as_component(controlnext))

    def load_controlnext(self, path_or_id: str | Path, variant: str | None = None, **kwargs: Any) -> ControlNeXtModel:
        """Load a control module (file, folder or hub id), check it fits this backbone, and add it to the pipeline."""
        from ..loading import load_controlnext

        module = load_controlnext(path_or_id, variant=variant, family=detect_family(self).name, **kwargs)
        module = module.to(device=self.backbone.device, dtype=self.backbone.dtype)
        self.set_controlnext([*self.controlnext_modules, module])
        return module

    def load_unet_weights(self, path: str | Path, mode: str = "auto", keep_base: bool = False, **kwargs: Any) -> str:
        """Apply trained UNet weights (a subset as values or deltas, as the releases ship them); returns the mode.

        ``keep_base`` keeps a CPU copy of the base values of the tensors it changes, so that
        :meth:`unload_unet_weights` and :meth:`base_unet_weights` can bring the base model back exactly (a full-UNet
        file would double the memory, hence opt-in).
        """
        from ..loading import load_unet_weights

        originals = self.__dict__.setdefault("_unet_originals", {}) if keep_base else None
        mode, keys = load_unet_weights(self.backbone, path, mode=mode, originals=originals, **kwargs)
        if not keep_base:
            self.__dict__.setdefault("_unet_unkept", set()).update(keys)
        return mode

    def unload_unet_weights(self) -> None:
        """Put back the base values of every tensor changed by :meth:`load_unet_weights` (with ``keep_base``)."""
        self._swap_unet_originals()
        self.__dict__.pop("_unet_originals", None)

    @contextmanager
    def base_unet_weights(self):
        """Within the block the backbone has its base weights (the ones before :meth:`load_unet_weights`)."""
        if self.__dict__.get("_unet_unkept"):
            raise ValueError(
                "UNet weights were loaded without keep_base=True, so the base values are gone; load them with "
                "load_unet_weights(..., keep_base=True) to compare against the base model."
            )
        self._swap_unet_originals()
        try:
            yield self
        finally:
            self._swap_unet_originals()

    def _swap_unet_originals(self) -> None:
        params = dict(self.backbone.named_parameters())
        params.update(dict(self.backbone.named_buffers()))
        with torch.no_grad():
            for name, saved in self.__dict__.get("_unet_originals", {}).items():
                current = params[name].detach().to("cpu", copy=True)
                params[name].copy_(saved.to(params[name].device, params[name].dtype))
                self._unet_originals[name] = current

    # ------------------------------------------------------------------ call
    def _stock_arguments(self, args: tuple, kwargs: dict) -> dict:
        """The stock call's arguments, all by name (positional ones too), so that defaults can be filled in."""
        sig = inspect.signature(super().__call__)
        call = {}
        for name, value in sig.bind_partial(*args, **kwargs).arguments.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        return call

    def _control_size(self, call: dict, first_condition: torch.Tensor) -> None:
        """Default the output size to the condition's, as diffusers' ControlNet pipelines do.

        Rounded down to a multiple of both the VAE factor (whole latents) and ``STOCK_SIZE_MULTIPLE`` (what the
        stock ``check_inputs`` accepts), at least one multiple; refused above ``MAX_DEFAULT_SIDE``.
        """
        params = inspect.signature(super().__call__).parameters
        if "height" not in params or call.get("image") is not None:
            return  # img2img / inpainting: the init image sets the size; conditions are fitted to the latents
        # Whole latent patches (the DiT families patchify latents 2x2) and what the stock pipeline accepts.
        multiple = math.lcm(self.vae_scale_factor * detect_family(self).latent_patch, STOCK_SIZE_MULTIPLE)
        h, w = first_condition.shape[-2:]
        for name, side in (("height", h), ("width", w)):
            if call.get(name) is not None:
                continue
            if side > MAX_DEFAULT_SIDE:
                raise ValueError(
                    f"The condition is {w}x{h} (WxH); the output size follows the condition only up to "
                    f"{MAX_DEFAULT_SIDE} px per side. Pass height and width (the condition is resized to them)."
                )
            call[name] = max(multiple, side // multiple * multiple)

    @staticmethod
    def _check_condition_batch(call: dict, rows: int) -> None:
        """The batch rule of diffusers' ControlNet pipelines (one condition, or one per prompt), plus one per image."""
        prompts = _prompt_batch(call)
        if prompts is None:
            return
        per_prompt = call.get("num_images_per_prompt") or 1
        if rows not in (1, prompts, prompts * per_prompt):
            raise ValueError(
                f"{rows} control images cannot be spread over {prompts} prompt(s) x {per_prompt} image(s) per "
                f"prompt: give one condition, one per prompt ({prompts}) or one per generated image "
                f"({prompts * per_prompt})."
            )

    def __call__(
        self,
        *args: Any,
        control_image: Any = None,
        controlnext_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        **kwargs: Any,
    ):
        r"""The stock pipeline call, plus ControlNeXt control.

        Args:
            control_image: the condition for each module, in any format diffusers' ControlNet pipelines take: one
                image (PIL, NumPy (H, W[, C]), tensor (C, H, W) in [0, 1], or a file path) or a batch (NumPy
                (B, H, W, C), tensor (B, C, H, W), or a list of images or of (1, C, H, W) tensors) with one image,
                one per prompt or one per generated image; with several modules, a list with one entry per module.
            controlnext_conditioning_scale: multiplies each module's control (float in [0, 10], or one per
                module); 0 turns the control off exactly, and with every scale 0 no control_image is needed.
            control_guidance_start / control_guidance_end: fraction of the denoising schedule where each module's
                control is applied (float, or one per module).
        """
        call = self._stock_arguments(args, kwargs)
        if "guidance_scale" in call:
            check_number("guidance_scale", call["guidance_scale"], 0.0, MAX_GUIDANCE_SCALE)
        modules = self.controlnext_modules
        if not modules:
            if control_image is not None:
                raise ValueError("control_image was given but no ControlNeXt module is loaded (see load_controlnext).")
            return super().__call__(**call)
        n = len(modules)
        scales = _per_module(controlnext_conditioning_scale, n, "controlnext_conditioning_scale")
        scales = [check_number("controlnext_conditioning_scale", s, 0.0, MAX_CONTROL_SCALE) for s in scales]
        if control_image is None:
            if not any(scales):
                return super().__call__(**call)
            raise ValueError(
                "control_image is required when a ControlNeXt module is loaded; to generate without control pass "
                "controlnext_conditioning_scale=0 (no control_image needed then) or use set_controlnext(None)."
            )
        images = [control_image] if n == 1 else _per_module(control_image, n, "control_image")
        starts = _per_module(control_guidance_start, n, "control_guidance_start")
        ends = _per_module(control_guidance_end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"Need 0 <= control_guidance_start < control_guidance_end <= 1; got {s} and {e}.")
        conditions = [load_condition(img) for img in images]
        for cond in conditions:
            self._check_condition_batch(call, cond.shape[0])
        self._control_size(call, conditions[0])

        device = self._execution_device
        conditions = [c.to(device=device, dtype=m.dtype) for c, m in zip(conditions, modules)]
        with attached(
            self.backbone, modules, conditions, scales, starts=starts, ends=ends,
            run=_LiveRun(self), pixel_factor=self.vae_scale_factor,
        ) as adapter:  # fmt: skip
            self._wrap_step_callback(adapter, call)
            return super().__call__(**call)

    @staticmethod
    def _wrap_step_callback(adapter: ControlNeXtAdapter, kwargs: dict) -> None:
        """Advance the adapter's step counter after each denoising step, then call the user's callback."""
        user = kwargs.get("callback_on_step_end")
        if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
            kwargs["callback_on_step_end_tensor_inputs"] = user.tensor_inputs
        adapter.set_step(0)

        def on_step_end(pipe, i, t, callback_kwargs):
            adapter.set_step(i + 1)
            return user(pipe, i, t, callback_kwargs) if user is not None else {}

        kwargs["callback_on_step_end"] = on_step_end


def _call_signature(stock_cls: type) -> inspect.Signature:
    """The stock ``__call__`` signature with the control arguments added (keyword-only, before ``**kwargs``)."""
    stock = inspect.signature(stock_cls.__call__)
    ours = inspect.signature(ControlNeXtPipelineMixin.__call__).parameters.values()
    ours = [p for p in ours if p.kind is inspect.Parameter.KEYWORD_ONLY]
    head = [p for p in stock.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    tail = [p for p in stock.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return stock.replace(parameters=[*head, *ours, *tail])


def with_controlnext(stock_cls: type) -> type:
    """Give a ControlNeXt subclass of ``stock_cls`` the stock ``__init__`` and ``__call__`` signatures plus ours.

    diffusers reads the components and their types from ``inspect.signature`` and ``typing.get_type_hints`` of
    ``__init__`` (``from_pretrained``, ``from_pipe``); ``help()`` and code that inspects the call's arguments read
    ``inspect.signature(__call__)``.
    """

    def decorate(cls: type) -> type:
        def __init__(self, *args: Any, controlnext: Any = None, **kwargs: Any) -> None:
            ControlNeXtPipelineMixin.__init__(self, *args, controlnext=controlnext, **kwargs)

        component = ControlNeXtModel | MultiControlNeXtModel | None
        sig = inspect.signature(stock_cls.__init__)
        extra = inspect.Parameter("controlnext", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=component)
        __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
        __init__.__annotations__ = {**typing.get_type_hints(stock_cls.__init__), "controlnext": component}
        __init__.__doc__ = f"Components of `{stock_cls.__name__}`, plus `controlnext` (a ControlNeXtModel or a list)."
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__
        cls._optional_components = [*getattr(stock_cls, "_optional_components", []), "controlnext"]

        if "__call__" not in cls.__dict__:  # a class with its own denoising loop (video) keeps its own call

            def __call__(self, *args: Any, **kwargs: Any):
                return ControlNeXtPipelineMixin.__call__(self, *args, **kwargs)

            __call__.__signature__ = _call_signature(stock_cls)
            __call__.__doc__ = (
                f"{inspect.cleandoc(ControlNeXtPipelineMixin.__call__.__doc__)}\n\n"
                f"The other arguments are those of `{stock_cls.__name__}.__call__`:\n\n"
                f"{inspect.cleandoc(stock_cls.__call__.__doc__ or '')}"
            )
            __call__.__qualname__ = f"{cls.__qualname__}.__call__"
            cls.__call__ = __call__
        return cls

    return decorate
