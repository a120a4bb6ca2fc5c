"""`controlnext web`: a local gradio app on the library's pipelines (needs the ``web`` extra: gradio).

Import :func:`build_app` / :func:`launch` from :mod:`controlnext.web.app`; :func:`default_model` names the model
the app opens on.
"""

from __future__ import annotations

from .generation import GenerationSettings, read_settings
from .limits import Limits
from .models import ModelSpec, default_model

__all__ = ["GenerationSettings", "Limits", "ModelSpec", "default_model", "read_settings", "build_app", "launch"]


def __getattr__(name: str):
    # gradio is imported only when the app itself is needed.
    if name in ("build_app", "launch", "WebConfig"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
