"""controlnext: ControlNeXt control for stock diffusers UNets (SD1.5, SDXL, SVD)."""

from .cross_norm import cross_normalize
from .inject import ControlNeXtAdapter, attach, attached
from .models.controlnext import ControlNeXtModel, ControlNeXtOutput
from .models.variants import VARIANTS

__version__ = "0.1.0"

__all__ = [
    "ControlNeXtAdapter",
    "ControlNeXtModel",
    "ControlNeXtOutput",
    "VARIANTS",
    "attach",
    "attached",
    "cross_normalize",
]
