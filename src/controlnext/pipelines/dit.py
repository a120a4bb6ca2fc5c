"""ControlNeXt pipelines for the transformer (DiT) bases SD3/SD3.5 and Flux.1: text-to-image, image-to-image and
inpainting.

As for the UNet families, each is the stock diffusers pipeline with the control module attached to its transformer
for the duration of the stock call (:class:`~controlnext.pipelines.common.ControlNeXtPipelineMixin`). SD3's
classifier-free guidance batch [uncond, cond] is served by one encoding of each condition; Flux-dev's guidance is
distilled (one call per step), and its optional true CFG (``true_cfg_scale`` > 1 with a ``negative_prompt``) makes a
second transformer call per step, which gets the same control.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)

from .common import ControlNeXtPipelineMixin, with_controlnext

__all__ = [
    "FluxControlNeXtImg2ImgPipeline",
    "FluxControlNeXtInpaintPipeline",
    "FluxControlNeXtPipeline",
    "StableDiffusion3ControlNeXtImg2ImgPipeline",
    "StableDiffusion3ControlNeXtInpaintPipeline",
    "StableDiffusion3ControlNeXtPipeline",
]


@with_controlnext(StableDiffusion3Pipeline)
class StableDiffusion3ControlNeXtPipeline(ControlNeXtPipelineMixin, StableDiffusion3Pipeline):
    """SD3/SD3.5 text-to-image with ControlNeXt; stock `StableDiffusion3Pipeline` arguments plus `control_image`, ..."""

    def __call__(self, *args: Any, skip_guidance_layers: list[int] | None = None, **kwargs: Any):
        # Skip-layer guidance adds a transformer call on the conditional half alone, inside a guidance run whose
        # other calls hold both halves; the adapter's batch mapping cannot tell the two apart.
        if skip_guidance_layers is not None and self.controlnext_modules:
            raise ValueError(
                "skip_guidance_layers (skip-layer guidance) is not supported with ControlNeXt control: it adds a "
                "transformer call on the conditional half alone. Leave it unset, or remove the control module."
            )
        return super().__call__(*args, skip_guidance_layers=skip_guidance_layers, **kwargs)


@with_controlnext(StableDiffusion3Img2ImgPipeline)
class StableDiffusion3ControlNeXtImg2ImgPipeline(ControlNeXtPipelineMixin, StableDiffusion3Img2ImgPipeline):
    """SD3/SD3.5 image-to-image with ControlNeXt (`image` is the init image, `control_image` the condition)."""


@with_controlnext(StableDiffusion3InpaintPipeline)
class StableDiffusion3ControlNeXtInpaintPipeline(ControlNeXtPipelineMixin, StableDiffusion3InpaintPipeline):
    """SD3/SD3.5 inpainting with ControlNeXt (`image`, `mask_image`, and `control_image`)."""


@with_controlnext(FluxPipeline)
class FluxControlNeXtPipeline(ControlNeXtPipelineMixin, FluxPipeline):
    """Flux.1 text-to-image with ControlNeXt; stock `FluxPipeline` arguments (incl. `true_cfg_scale`) plus
    `control_image`, ..."""


@with_controlnext(FluxImg2ImgPipeline)
class FluxControlNeXtImg2ImgPipeline(ControlNeXtPipelineMixin, FluxImg2ImgPipeline):
    """Flux.1 image-to-image with ControlNeXt (`image` is the init image, `control_image` the condition)."""


@with_controlnext(FluxInpaintPipeline)
class FluxControlNeXtInpaintPipeline(ControlNeXtPipelineMixin, FluxInpaintPipeline):
    """Flux.1 inpainting with ControlNeXt (`image`, `mask_image`, and `control_image`)."""
