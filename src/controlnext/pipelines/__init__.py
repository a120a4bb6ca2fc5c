"""Diffusers-style ControlNeXt pipelines (thin subclasses of the stock diffusers pipelines)."""

from .common import ControlNeXtPipelineMixin, MultiControlNeXtModel
from .dit import (
    FluxControlNeXtImg2ImgPipeline,
    FluxControlNeXtInpaintPipeline,
    FluxControlNeXtPipeline,
    StableDiffusion3ControlNeXtImg2ImgPipeline,
    StableDiffusion3ControlNeXtInpaintPipeline,
    StableDiffusion3ControlNeXtPipeline,
)
from .stable_diffusion import (
    StableDiffusionControlNeXtImg2ImgPipeline,
    StableDiffusionControlNeXtInpaintPipeline,
    StableDiffusionControlNeXtPipeline,
    StableDiffusionXLControlNeXtImg2ImgPipeline,
    StableDiffusionXLControlNeXtInpaintPipeline,
    StableDiffusionXLControlNeXtPipeline,
)

__all__ = [
    "ControlNeXtPipelineMixin",
    "FluxControlNeXtImg2ImgPipeline",
    "FluxControlNeXtInpaintPipeline",
    "FluxControlNeXtPipeline",
    "MultiControlNeXtModel",
    "StableDiffusion3ControlNeXtImg2ImgPipeline",
    "StableDiffusion3ControlNeXtInpaintPipeline",
    "StableDiffusion3ControlNeXtPipeline",
    "StableDiffusionControlNeXtImg2ImgPipeline",
    "StableDiffusionControlNeXtInpaintPipeline",
    "StableDiffusionControlNeXtPipeline",
    "StableDiffusionXLControlNeXtImg2ImgPipeline",
    "StableDiffusionXLControlNeXtInpaintPipeline",
    "StableDiffusionXLControlNeXtPipeline",
]


def __getattr__(name: str):
    # The video pipeline lives in its own module (optional video extra); import it lazily.
    if name == "StableVideoDiffusionControlNeXtPipeline":
        from .svd import StableVideoDiffusionControlNeXtPipeline

        return StableVideoDiffusionControlNeXtPipeline
    raise AttributeError(name)
