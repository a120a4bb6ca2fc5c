"""What every ControlNeXt pipeline adds to its stock diffusers parent: a `controlnext` component and control inputs.

The pipelines are thin subclasses: `__call__` prepares the conditions, attaches the module(s) to the UNet with
:func:`controlnext.attach` for the duration of the stock `__call__`, and detaches afterwards (also on error), so the
stock denoising loop, schedulers, callbacks, LoRA, offloading and output types work unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..conditioning import load_condition
from ..families import detect_family
from ..inject import ControlNeXtAdapter, attached
from ..models.controlnext import ControlNeXtModel


class MultiControlNeXtModel(ModelMixin):
    """Several ControlNeXt modules used together (their controls are summed); saved as ``module_0``, ``module_1``..."""

    def __init__(self, modules: Sequence[ControlNeXtModel]):
        super().__init__()
        self.nets = nn.ModuleList(modules)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        for i, net in enumerate(self.nets):
            net.save_pretrained(Path(save_directory) / f"module_{i}", **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MultiControlNeXtModel:
        root = Path(pretrained_model_name_or_path)
        subdirs = sorted((p for p in root.glob("module_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        if not subdirs:
            raise FileNotFoundError(f"{root} holds no module_0, module_1, ... folders of a MultiControlNeXtModel.")
        dtype = kwargs.get("torch_dtype")
        return cls([ControlNeXtModel.from_pretrained(str(p), torch_dtype=dtype) for p in subdirs])


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


class ControlNeXtPipelineMixin:
    """Mixed into a stock diffusers pipeline class (placed before it in the bases); see :func:`with_controlnext`."""

    controlnext: ModelMixin | None
    # The small control module stays on the execution device under `enable_model_cpu_offload`: it runs inside the
    # UNet call at every step, so offloading it would move it back and forth each step.
    _exclude_from_cpu_offload = ["controlnext"]

    def __init__(self, *args: Any, controlnext: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_modules(controlnext=_as_component(controlnext))

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

    def load_unet_weights(self, path: str | Path, mode: str = "auto", **kwargs: Any) -> str:
        """Apply trained UNet weights (a subset as values or deltas, as the releases ship them)."""
        from ..loading import load_unet_weights

        return load_unet_weights(self.backbone, path, mode=mode, **kwargs)[0]

    # ------------------------------------------------------------------ call
    def _control_size(self, args: tuple, kwargs: dict, first_condition: torch.Tensor) -> None:
        """Default the output size to the condition's (rounded down to the VAE factor times the transformer's patch),
        as diffusers' ControlNet does."""
        params = inspect.signature(super().__call__).parameters
        if "height" not in params or "image" in params and ("image" in kwargs or len(args) > 1):
            return  # img2img: the init image sets the size; conditions are fitted to the latents
        f = self.vae_scale_factor * detect_family(self).latent_patch
        h, w = first_condition.shape[-2:]
        if kwargs.get("height") is None:
            kwargs["height"] = max(f, h // f * f)
        if kwargs.get("width") is None:
            kwargs["width"] = max(f, w // f * f)

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
            control_image: the condition for each module: one image (PIL, array, tensor in [0, 1], path) or a batch
                (list, one per prompt or per generated image); with several modules, a list with one entry per module.
            controlnext_conditioning_scale: multiplies each module's control (float, or one per module); 0 turns the
                control off exactly.
            control_guidance_start / control_guidance_end: fraction of the denoising schedule where each module's
                control is applied (float, or one per module).
            *args, **kwargs: the stock diffusers arguments (prompt, num_inference_steps, guidance_scale, ...).
        """
        modules = self.controlnext_modules
        if not modules:
            if control_image is not None:
                raise ValueError("control_image was given but no ControlNeXt module is loaded (see load_controlnext).")
            return super().__call__(*args, **kwargs)
        if control_image is None:
            raise ValueError(
                "control_image is required when a ControlNeXt module is loaded; to generate without control pass "
                "controlnext_conditioning_scale=0 or use a pipeline without the module."
            )
        n = len(modules)
        images = [control_image] if n == 1 else _per_module(control_image, n, "control_image")
        scales = _per_module(controlnext_conditioning_scale, n, "controlnext_conditioning_scale")
        starts = _per_module(control_guidance_start, n, "control_guidance_start")
        ends = _per_module(control_guidance_end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"Need 0 <= control_guidance_start < control_guidance_end <= 1; got {s} and {e}.")
        conditions = [load_condition(img) for img in images]
        self._control_size(args, kwargs, conditions[0])

        device = self._execution_device
        conditions = [c.to(device=device, dtype=m.dtype) for c, m in zip(conditions, modules)]
        with attached(
            self.backbone, modules, conditions, scales, starts=starts, ends=ends,
            run=_LiveRun(self), pixel_factor=self.vae_scale_factor,
        ) as adapter:  # fmt: skip
            self._wrap_step_callback(adapter, kwargs)
            return super().__call__(*args, **kwargs)

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


def with_controlnext(stock_cls: type) -> type:
    """Give a ControlNeXt subclass of ``stock_cls`` an ``__init__`` signature that diffusers' loader understands."""

    def decorate(cls: type) -> type:
        def __init__(self, *args: Any, controlnext: Any = None, **kwargs: Any) -> None:
            ControlNeXtPipelineMixin.__init__(self, *args, controlnext=controlnext, **kwargs)

        sig = inspect.signature(stock_cls.__init__)
        extra = inspect.Parameter("controlnext", inspect.Parameter.KEYWORD_ONLY, default=None)
        __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
        __init__.__doc__ = f"Components of `{stock_cls.__name__}`, plus `controlnext` (a ControlNeXtModel or a list)."
        cls.__init__ = __init__
        cls._optional_components = [*getattr(stock_cls, "_optional_components", []), "controlnext"]
        return cls

    return decorate
