"""ControlNeXt pipelines for Stable Diffusion 1.5 and SDXL: text-to-image, image-to-image and inpainting."""

from __future__ import annotations

from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from .common import ControlNeXtPipelineMixin, with_controlnext

__all__ = [
    "StableDiffusionControlNeXtPipeline",
    "StableDiffusionControlNeXtImg2ImgPipeline",
    "StableDiffusionControlNeXtInpaintPipeline",
    "StableDiffusionXLControlNeXtPipeline",
    "StableDiffusionXLControlNeXtImg2ImgPipeline",
    "StableDiffusionXLControlNeXtInpaintPipeline",
]


@with_controlnext(StableDiffusionPipeline)
class StableDiffusionControlNeXtPipeline(ControlNeXtPipelineMixin, StableDiffusionPipeline):
    """SD1.5 text-to-image with ControlNeXt; stock `StableDiffusionPipeline` arguments plus `control_image`, ..."""


@with_controlnext(StableDiffusionImg2ImgPipeline)
class StableDiffusionControlNeXtImg2ImgPipeline(ControlNeXtPipelineMixin, StableDiffusionImg2ImgPipeline):
    """SD1.5 image-to-image with ControlNeXt (`image` is the init image, `control_image` the condition)."""


@with_controlnext(StableDiffusionInpaintPipeline)
class StableDiffusionControlNeXtInpaintPipeline(ControlNeXtPipelineMixin, StableDiffusionInpaintPipeline):
    """SD1.5 inpainting with ControlNeXt (`image`, `mask_image`, and `control_image`)."""


@with_controlnext(StableDiffusionXLPipeline)
class StableDiffusionXLControlNeXtPipeline(ControlNeXtPipelineMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image with ControlNeXt."""


@with_controlnext(StableDiffusionXLImg2ImgPipeline)
class StableDiffusionXLControlNeXtImg2ImgPipeline(ControlNeXtPipelineMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image with ControlNeXt."""


@with_controlnext(StableDiffusionXLInpaintPipeline)
class StableDiffusionXLControlNeXtInpaintPipeline(ControlNeXtPipelineMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting with ControlNeXt."""
