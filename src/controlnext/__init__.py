"""controlnext: ControlNeXt control for stock diffusers UNets (SD1.5, SDXL, SVD).

The public names below are imported on first use, so that `import controlnext` (and the CLI's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ControlNeXtAdapter": "controlnext.inject",
    "attach": "controlnext.inject",
    "attached": "controlnext.inject",
    "cross_normalize": "controlnext.cross_norm",
    "ControlNeXtModel": "controlnext.models.controlnext",
    "ControlNeXtOutput": "controlnext.models.controlnext",
    "VARIANTS": "controlnext.models.variants",
    "load_controlnext": "controlnext.loading",
    "load_unet_weights": "controlnext.loading",
}

__all__ = [
    "VARIANTS",
    "ControlNeXtAdapter",
    "ControlNeXtModel",
    "ControlNeXtOutput",
    "attach",
    "attached",
    "cross_normalize",
    "load_controlnext",
    "load_unet_weights",
]

if TYPE_CHECKING:
    from .cross_norm import cross_normalize
    from .inject import ControlNeXtAdapter, attach, attached
    from .loading import load_controlnext, load_unet_weights
    from .models.controlnext import ControlNeXtModel, ControlNeXtOutput
    from .models.variants import VARIANTS


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'controlnext' has no attribute {name!r}")
