"""The preprocessor options of the web app, generated from the preprocessor registry.

Every option of every preprocessor in :data:`controlnext.preprocess.REGISTRY` is either a widget of the page (one
group of widgets per preprocessor, shown while it is selected) or set by the server (:func:`server_options`). The
handlers get the selected preprocessor's options as one dict, which :class:`OptionWidgets` builds from an event's
values in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr

from ..preprocess.registry import REGISTRY, Option

__all__ = ["OptionWidgets", "page_options", "preprocessor_choices", "server_options"]

# A number range with more steps than this is typed into a number box, not dragged on a slider (the segment seed).
_MAX_SLIDER_STEPS = 10_000


def server_options(name: str, config: Any = None, width: int | None = None, height: int | None = None) -> dict:
    """The options of preprocessor ``name`` that the server sets, never the page.

    Model files come from the server's settings (``config.pose_models``, ``config.depth_model``), the pose canvas is
    the output size (the page's uploads are pictures fitted to it, never keypoint files), and a page never makes the
    server download a model.
    """
    if name == "pose":
        return {"model_dir": getattr(config, "pose_models", None), "width": width, "height": height}
    if name == "depth":
        return {"model": getattr(config, "depth_model", None), "allow_download": False}
    return {}


def page_options(name: str) -> tuple[Option, ...]:
    """The options of preprocessor ``name`` that the page has a widget for: all but the server's and local paths."""
    fixed = server_options(name)
    return tuple(o for o in REGISTRY[name].options if not o.path and o.name not in fixed)


def preprocessor_choices() -> list[tuple[str, str]]:
    """The preprocessor dropdown's (label, name) pairs, in registry order."""
    return [(p.label or p.name, p.name) for p in REGISTRY.values()]


def _widget(opt: Option, value: Any, elem_id: str) -> gr.components.Component:
    """The widget for one option: a checkbox, a radio or dropdown of choices, a slider or a number box."""
    common = dict(label=opt.name.replace("_", " ").capitalize(), info=opt.help, elem_id=elem_id)
    if opt.type is bool:
        return gr.Checkbox(value=bool(value), **common)
    if opt.choices:
        kind = gr.Radio if len(opt.choices) <= 4 else gr.Dropdown
        return kind(list(opt.choices), value=value, **common)
    if opt.type in (int, float):
        step = opt.step or (1 if opt.type is int else None)
        ranged = opt.low is not None and opt.high is not None and step
        if ranged and value is not None and (opt.high - opt.low) / step <= _MAX_SLIDER_STEPS:
            return gr.Slider(opt.low, opt.high, value=value, step=step, **common)
        return gr.Number(value=value, minimum=opt.low, maximum=opt.high, step=step or 1,
                         precision=0 if opt.type is int else None, **common)  # fmt: skip
    return gr.Textbox(value="" if value is None else str(value), **common)


class OptionWidgets:
    """One widget per page option of every preprocessor, grouped per preprocessor; built in the current layout.

    Widget ids are ``cnx-<preprocessor>-<option>`` (underscores as dashes: ``cnx-canny-per-channel``).
    """

    def __init__(self, selected: str, values: Mapping[str, Any] | None = None):
        """``values`` are the starting options of the ``selected`` preprocessor (the others start at defaults)."""
        self.widgets: dict[tuple[str, str], gr.components.Component] = {}
        self.groups: dict[str, gr.Group] = {}
        for name, pre in REGISTRY.items():
            options = page_options(name)
            if not options:
                continue
            start = {**pre.defaults(), **(dict(values or {}) if name == selected else {})}
            with gr.Group(visible=name == selected) as group:
                for opt in options:
                    elem_id = f"cnx-{name}-{opt.name.replace('_', '-')}"
                    self.widgets[name, opt.name] = _widget(opt, start[opt.name], elem_id)
            self.groups[name] = group

    @property
    def components(self) -> list[gr.components.Component]:
        return list(self.widgets.values())

    def names(self) -> dict[gr.components.Component, str]:
        """Each widget's field name, ``<preprocessor>.<option>`` (how the API documentation names them)."""
        return {c: f"{pre}.{opt}" for (pre, opt), c in self.widgets.items()}

    def options(self, preprocessor: Any, data: Mapping[Any, Any]) -> dict[str, Any]:
        """The options of ``preprocessor`` from an event's ``{component: value}`` (gradio's set inputs)."""
        return {opt: data[c] for (pre, opt), c in self.widgets.items() if pre == preprocessor and c in data}

    def updates(self, values: Mapping[str, Mapping[str, Any]]) -> dict[gr.components.Component, Any]:
        """Widget values for ``{preprocessor: {option: value}}``; every other widget stays as it is."""
        return {c: values[pre][opt] for (pre, opt), c in self.widgets.items() if opt in values.get(pre, {})}

    def visibility(self, preprocessor: Any) -> list[dict[str, Any]]:
        """Show the selected preprocessor's group, hide the others (in :attr:`groups` order)."""
        return [gr.update(visible=name == preprocessor) for name in self.groups]
