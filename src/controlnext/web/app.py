"""The `controlnext web` gradio app: pick a model, upload a condition, preview it, generate, compare, download.

Safety defaults (see docs/web.md and docs/security.md): binds 127.0.0.1, no share link unless asked, events read
only files the server received (:mod:`.security`), cross-site posts refused, uploads limited in bytes and pixels,
decoded by content and deleted from the cache after ``upload_max_age``, typed model paths only for a local-only
app (or when explicitly allowed), no absolute server path in the page config, results in their own folder, one
generation at a time (a queue holds the rest), limits by device and model, and a per-request time budget that
also ends a generation whose client left.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
from PIL import Image

from .. import preprocess as pp
from .generation import GenerationSettings, GenerationStopped, generate, read_settings, resolve_seed
from .limits import ALLOWED_IMAGE_SUFFIXES, Limits, UploadError, load_upload, user_error
from .models import (
    ModelCache,
    ModelSpec,
    default_model,
    demo_models,
    validate_base_ref,
    validate_control_ref,
    validate_lora_ref,
)
from .options import OptionWidgets, page_options, preprocessor_choices, server_options
from .security import SameSiteMiddleware, UploadRecord, client_gone
from .video import build_video_tab

__all__ = ["WebConfig", "build_app", "launch", "is_local_host"]

def is_local_host(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WebConfig:
    """How the app is served and what it offers. ``models[0]`` is the one it opens on."""

    host: str = "127.0.0.1"
    port: int | None = None
    share: bool = False
    models: list[ModelSpec] = field(default_factory=list)
    outputs: Path = Path("controlnext-outputs")
    limits: Limits = field(default_factory=Limits.for_device)  # smaller on CPU
    allow_custom_models: bool | None = None  # None: only when the app is local-only (loopback, no share link)
    pose_models: Path | None = None
    depth_model: Path | None = None
    queue_size: int = 16
    cache_models: int = 1
    video_model: Any = None  # a controlnext.web.video.VideoSpec; None: tiny random SVD (offline)
    max_video_frames: int = 64
    upload_max_age: int = 3600  # seconds an upload (and gradio's cached copy of a result) stays in gradio's cache

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [*demo_models()] or [default_model()]
        self.outputs = Path(self.outputs).expanduser().resolve()
        if self.upload_max_age < 1:
            raise ValueError(f"upload_max_age must be at least 1 second, got {self.upload_max_age}.")

    @property
    def exposed(self) -> bool:
        return self.share or not is_local_host(self.host)

    @property
    def custom_models(self) -> bool:
        return (not self.exposed) if self.allow_custom_models is None else self.allow_custom_models


def shown_names(refs: Iterable[str]) -> dict[str, str]:
    """The name the page shows for each model reference, so that no absolute server path reaches the page.

    Built-ins and hub ids are shown as they are; a local path by its last parts (``demo/base``), as many as it
    takes to tell the given paths apart.
    """
    refs = list(dict.fromkeys(r for r in refs if r))
    local = [r for r in refs if os.path.isabs(r) or Path(r).exists()]
    shown = {r: r for r in refs if r not in local}
    for r in local:
        parts = Path(r).parts
        for n in range(min(2, len(parts)), len(parts) + 1):
            name = str(Path(*parts[-n:]))
            others = {str(Path(*Path(o).parts[-n:])) for o in local if o != r}
            if name not in others and name not in shown.values():
                break
        shown[r] = name
    return shown


class App:
    """State and event handlers of one app instance (kept separate from the layout so tests can call them)."""

    def __init__(self, config: WebConfig):
        self.config = config
        self._last_preview_error: tuple[Any, float] = (None, 0.0)  # (session, upload, message), time
        self.cache = ModelCache(config.cache_models)
        self.presets = {spec.label: spec for spec in config.models}
        self.uploads = UploadRecord()  # bound to the Blocks by build_app
        # The page shows model references by name; the server maps the names back to the references.
        self.shown = shown_names(r for s in config.models for r in (s.base, s.controlnext, s.lora) if r)
        self.refs = {name: ref for ref, name in self.shown.items()}
        # Per API name, the input fields in the order the HTTP API takes them (set by build_app): "preset", ...,
        # "<preprocessor>.<option>" for the option widgets.
        self.api_inputs: dict[str, list[str]] = {}
        self.video: Any = None  # the video tab's VideoTab (set by build_app; None without the video pipeline)

    def show(self, ref: str | None) -> str:
        """The page's name for a model reference (typed references are shown as typed)."""
        return self.shown.get(ref or "", ref or "")

    # ------------------------------------------------------------------ helpers
    def preset(self, label: str | None) -> ModelSpec:
        return self.presets.get(label or "", self.config.models[0])

    def max_side(self, spec: ModelSpec) -> int:
        """The largest output side for ``spec``: the device's limit, or the model's own when smaller."""
        return min(self.config.limits.max_side, spec.max_side or self.config.limits.max_side)

    def size_slider(self, spec: ModelSpec, value: int) -> dict[str, Any]:
        """Width/height slider settings for ``spec`` (fixed when the model makes one size only)."""
        side, low = self.max_side(spec), self.config.limits.min_side
        return dict(value=value, maximum=max(side, low + 8), interactive=side > low)

    def _resolve_spec(self, preset: str, base: str, control: str, lora: str, lora_weight: float) -> ModelSpec:
        spec = self.preset(preset)
        base, control, lora = ((v or "").strip() for v in (base, control, lora))
        base, control, lora = (self.refs.get(v, v) for v in (base, control, lora))
        known_bases = {s.base for s in self.config.models}
        known_controls = {s.controlnext or "" for s in self.config.models} | {""}
        known_loras = {s.lora or "" for s in self.config.models} | {""}
        if not self.config.custom_models and (
            base not in known_bases or control not in known_controls or lora not in known_loras
        ):
            raise ValueError(
                "This app is reachable from other machines, so only the models it was started with can be used "
                "(start it with --allow-model-paths to change that)."
            )
        base = validate_base_ref(base)
        control_ref = validate_control_ref(control)
        lora_ref = validate_lora_ref(lora)
        return spec.with_refs(base, control_ref, lora_ref, float(lora_weight))

    # What on_preset and on_load_settings return, in order; "options" is {preprocessor: {option: value}}.
    PRESET_FIELDS = ("base", "control", "lora", "lora_weight", "preprocessor", "options", "width", "height", "steps",
                     "guidance", "prompt", "preset_info")  # fmt: skip
    LOADED_FIELDS = ("base", "control", "lora", "lora_weight", "upload", "preprocessor", "options", "width", "height",
                     "prompt", "negative", "steps", "guidance", "control_scale", "control_start", "control_end", "seed",
                     "randomize", "batch")  # fmt: skip

    @staticmethod
    def checked_options(preprocessor: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every page option of ``preprocessor``: ``options`` typed and checked, the others at their defaults.

        The options the server sets (:func:`.options.server_options`: model files, downloads, the pose canvas) are
        refused here, so no request can choose them.
        """
        pre = pp.get_preprocessor(preprocessor if isinstance(preprocessor, str) else repr(preprocessor))
        allowed = [o.name for o in page_options(pre.name)]
        given = dict(options or {})
        extra = sorted(set(given) - set(allowed))
        if extra:
            raise ValueError(
                f"Preprocessor {pre.name!r} takes no option {', '.join(map(repr, extra))} from the page; its options "
                f"here: {', '.join(allowed) or 'none'}."
            )
        parsed = pre.parse(given)
        return {name: parsed[name] for name in allowed}

    def condition(
        self, upload: str | None, preprocessor: str, options: Mapping[str, Any] | None, width: int, height: int,
        fit: str,
    ) -> Image.Image | None:  # fmt: skip
        """Load the upload, fit it to the output size and run the preprocessor (errors: one-line ValueErrors)."""
        upload = self.uploads.path(upload)
        if not upload:
            return None
        options = self.checked_options(preprocessor, options)
        limits = self.config.limits
        for name, v in (("Width", width), ("Height", height)):
            if not (limits.min_side <= int(v) <= limits.max_side):
                raise ValueError(f"{name} must be between {limits.min_side} and {limits.max_side} pixels, got {v}.")
        image = pp.fit_to_size(pp.to_pil(load_upload(upload, limits)), int(width), int(height), fit)
        fixed = server_options(preprocessor, self.config, int(width), int(height))
        return pp.get_preprocessor(preprocessor).run(image, {**options, **fixed})

    # ------------------------------------------------------------------ event handlers
    def on_preset(self, label: str):
        """The form for preset ``label`` (in :attr:`PRESET_FIELDS` order)."""
        spec = self.preset(label)
        options = self.checked_options(spec.preprocessor, dict(spec.preprocessor_options))
        return (
            gr.update(value=self.show(spec.base)),
            gr.update(value=self.show(spec.controlnext)),
            gr.update(value=self.show(spec.lora)),
            spec.lora_weight,
            spec.preprocessor,
            {spec.preprocessor: options},
            gr.update(**self.size_slider(spec, spec.width)),
            gr.update(**self.size_slider(spec, spec.height)),
            spec.steps,
            spec.guidance,
            spec.prompt,
            f"**{spec.label}**. {spec.notes}",
        )

    def on_preview(
        self,
        upload: Any,
        preprocessor: str,
        options: Mapping[str, Any] | None,
        width: float,
        height: float,
        fit: str,
        request: gr.Request | None = None,
    ):
        """The condition preview: the upload fitted to the output size, through the preprocessor."""
        try:
            return self.condition(upload, preprocessor, options, width, height, fit)
        except (ValueError, FileNotFoundError, OSError) as err:
            # The browser fires `change` twice for some refused uploads: show one message for the same failure.
            key = (getattr(request, "session_hash", None), str(upload), str(err))
            now = time.monotonic()
            last_key, last_at = self._last_preview_error
            self._last_preview_error = (key, now)
            if key == last_key and now - last_at < 3.0:
                return gr.skip()
            raise user_error(err, "Condition") from None

    def on_generate(
        self,
        preset: str,
        base: str,
        control: str,
        lora: str,
        lora_weight: float,
        upload: str | None,
        preprocessor: str,
        options: Mapping[str, Any] | None,
        width: float,
        height: float,
        fit: str,
        prompt: str,
        negative: str,
        steps: float,
        guidance: float,
        control_scale: float,
        control_start: float,
        control_end: float,
        seed: float,
        randomize: bool,
        batch: float,
        progress=gr.Progress(track_tqdm=True),
    ):
        """Generate a batch from the form; ``options`` are the preprocessor's (see :meth:`checked_options`)."""
        started = time.monotonic()
        limits = self.config.limits
        try:
            spec = self._resolve_spec(preset, base, control, lora, lora_weight)
            opts = self.checked_options(preprocessor, options)
            settings = GenerationSettings(
                prompt=prompt or "",
                negative_prompt=negative or "",
                steps=_whole(steps, "Steps"),
                guidance=float(guidance),
                control_scale=float(control_scale),
                control_start=float(control_start),
                control_end=float(control_end),
                seed=resolve_seed(seed, randomize),
                batch_size=_whole(batch, "Batch size"),
                width=_whole(width, "Width"),
                height=_whole(height, "Height"),
                base=spec.base,
                controlnext=spec.controlnext,
                lora=spec.lora,
                lora_weight=spec.lora_weight,
                preprocessor=preprocessor,
                preprocessor_options=opts,
            )
            settings.validate(limits)
            side = self.max_side(spec)
            if max(settings.width, settings.height) > side:
                raise ValueError(
                    f"{spec.label} makes images up to {side}x{side} pixels"
                    + (" (its native size)" if side == spec.max_side else "")
                    + f"; got {settings.width}x{settings.height}."
                )
            if spec.controlnext and not self.uploads.path(upload):
                raise ValueError("Upload a condition image first (or choose no control module).")
            progress(0.0, desc="Loading model")
            loaded = self.cache.get(spec)
            progress(0.0, desc="Preparing condition")
            condition = self.condition(upload, preprocessor, opts, settings.width, settings.height, fit)
            if not loaded.has_control:
                condition = None
            settings.scheduler = type(loaded.pipe.scheduler).__name__
            with loaded.lock:
                if loaded.lora_loaded:
                    loaded.pipe.set_adapters(["user_lora"], adapter_weights=[settings.lora_weight])
                paths, cond_path, seconds = generate(
                    loaded.pipe,
                    condition,
                    settings,
                    self.config.outputs,
                    on_step=lambda i, n: progress((i, n), desc="Denoising", unit="steps"),
                    should_stop=lambda: self.stop_reason(started),
                )
        except GenerationStopped as err:
            raise user_error(err, "Generation stopped") from None
        except (ValueError, FileNotFoundError, UploadError) as err:
            raise user_error(err, "Cannot generate") from None
        gallery = ([(str(cond_path), "condition")] if cond_path else []) + [
            (str(p), f"seed {settings.seed + i}") for i, p in enumerate(paths)
        ]
        info = (
            f"{len(paths)} image(s) in {seconds:.1f} s; seeds {settings.seed}..{settings.seed + len(paths) - 1}; "
            f"saved in `{paths[0].parent.name}/` of the outputs folder. Settings are stored in each PNG."
        )
        return gallery, [str(p) for p in paths], info, settings.seed

    def stop_reason(self, started: float) -> str | None:
        """Why a request that started at ``started`` (``time.monotonic()``) must stop now, or None."""
        if client_gone():
            return "the page that asked for it was closed or lost its connection."
        budget = self.config.limits.max_seconds
        if time.monotonic() - started > budget:
            return (
                f"the request ran past its time budget of {budget:g} s. Fewer steps, a smaller size or a smaller "
                "batch finish sooner."
            )
        return None

    def on_load_settings(self, png: Any):
        """The form from a result PNG's metadata (:attr:`LOADED_FIELDS` order), condition restored when it can be.

        The condition comes back when it is still in the outputs folder with the recorded hash.
        """
        try:
            png = self.uploads.path(png)
        except ValueError as err:
            raise user_error(err, "Reproduce") from None
        if not png:
            raise user_error("Upload a PNG saved by this app.", "Reproduce")
        try:
            load_upload(png, self.config.limits)
            data = read_settings(png)
            s = GenerationSettings.from_json(data)
            options = self.checked_options(s.preprocessor, s.preprocessor_options)
        except (ValueError, OSError, TypeError) as err:
            raise user_error(err, "Reproduce") from None
        condition = self._find_condition(data.get("condition_file"), data.get("condition_sha256"))
        note = (
            "Settings loaded; the original condition was restored, so the preprocessor is set to none."
            if condition
            else "Settings loaded; upload the condition image again (it is not in the outputs folder)."
        )
        gr.Info(note)
        return (  # in LOADED_FIELDS order; the saved options fill their preprocessor's widgets even when it is "none"
            gr.update(value=self.show(s.base)),
            gr.update(value=self.show(s.controlnext)),
            gr.update(value=self.show(s.lora)),
            s.lora_weight,
            gr.update(value=condition) if condition else gr.update(),
            "none" if condition else s.preprocessor,
            {s.preprocessor: options},
            s.width,
            s.height,
            s.prompt,
            s.negative_prompt,
            s.steps,
            s.guidance,
            s.control_scale,
            s.control_start,
            s.control_end,
            s.seed,
            False,
            s.batch_size,
        )

    def _find_condition(self, name: Any, sha: Any) -> str | None:
        # The name comes from an uploaded file, so only the app's own naming pattern inside the outputs folder is
        # looked at, and the content must match the recorded hash.
        if not isinstance(name, str) or not re.fullmatch(r"\d{5}-condition\.png", name) or not isinstance(sha, str):
            return None
        import hashlib

        for folder in sorted(self.config.outputs.glob("????-??-??"), reverse=True):
            path = folder / name
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
                return str(path)
        return None


def _whole(value: float, name: str) -> int:
    if value is None or float(value) != int(float(value)):
        raise ValueError(f"{name} must be a whole number, got {value}.")
    return int(float(value))


def _parameters(handler: Callable) -> list[str]:
    """The form fields an App handler takes: its parameters, less the ones gradio fills (request, progress)."""
    return [n for n in inspect.signature(handler).parameters if n not in ("request", "progress")]


CSS = """
#cnx-gallery .thumbnail-item { image-rendering: pixelated; }
#cnx-preview img { image-rendering: pixelated; }
"""


def build_app(config: WebConfig | None = None) -> gr.Blocks:
    """Build the gradio Blocks of the app (not launched; see :func:`launch`)."""
    config = config or WebConfig()
    app = App(config)
    limits = config.limits
    first = config.models[0]
    custom = config.custom_models
    model_choices = list(dict.fromkeys(app.show(s.base) for s in config.models))
    control_choices = list(dict.fromkeys([*(app.show(s.controlnext) for s in config.models), ""]))
    # Uploads and gradio's cached copies of results are deleted once they are older than upload_max_age.
    delete_cache = (max(1, min(600, config.upload_max_age // 4)), config.upload_max_age)

    with gr.Blocks(title="ControlNeXt", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(
            "# ControlNeXt\nUpload a condition (edges, mask, pose, depth...), preview it, write a prompt and "
            "generate. Results and their settings are saved as PNG files you can download and reproduce."
        )
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Accordion("Model", open=True):
                        preset = gr.Dropdown(
                            choices=list(app.presets), value=first.label, label="Preset", elem_id="cnx-preset"
                        )
                        preset_info = gr.Markdown(f"**{first.label}**. {first.notes}")
                        base = gr.Dropdown(
                            choices=model_choices,
                            value=app.show(first.base),
                            allow_custom_value=custom,
                            label="Base model" + (" (folder, .safetensors file or hub id)" if custom else ""),
                            elem_id="cnx-base",
                        )
                        control = gr.Dropdown(
                            choices=control_choices,
                            value=app.show(first.controlnext),
                            allow_custom_value=custom,
                            label="ControlNeXt module" + (" (file, folder or hub id; empty = none)" if custom else ""),
                            elem_id="cnx-control",
                        )
                        with gr.Row():
                            lora = gr.Textbox(
                                value=app.show(first.lora),
                                label="LoRA (file or folder)",
                                interactive=custom,
                                scale=3,
                                elem_id="cnx-lora",
                            )
                            lora_weight = gr.Slider(-2, 2, value=first.lora_weight, step=0.05, label="LoRA weight")
                    with gr.Row():
                        upload = gr.Image(
                            type="filepath",
                            sources=["upload", "clipboard"],
                            label=f"Condition or source image (max {limits.max_upload_mb:g} MB)",
                            elem_id="cnx-upload",
                            height=256,
                        )
                        preview = gr.Image(
                            label="Condition preview", interactive=False, elem_id="cnx-preview", height=256
                        )
                    preprocessor = gr.Dropdown(
                        choices=preprocessor_choices(), value=first.preprocessor, label="Preprocessor",
                        elem_id="cnx-preprocessor",
                    )  # fmt: skip
                    fit = gr.Radio(["crop", "pad", "stretch"], value="crop", label="Fit the upload to the size by")
                    widgets = OptionWidgets(first.preprocessor, dict(first.preprocessor_options))
                    prompt = gr.Textbox(value=first.prompt, label="Prompt", lines=2, elem_id="cnx-prompt")
                    negative = gr.Textbox(value="", label="Negative prompt", lines=1)
                    with gr.Row():
                        steps = gr.Slider(
                            1, limits.max_steps, value=first.steps, step=1, label="Steps", elem_id="cnx-steps"
                        )
                        guidance = gr.Slider(0, limits.max_guidance, value=first.guidance, step=0.5, label="Guidance")
                    with gr.Row():
                        control_scale = gr.Slider(
                            0, limits.max_control_scale, value=1.0, step=0.05, label="Control scale"
                        )
                        control_start = gr.Slider(0, 1, value=0.0, step=0.01, label="Control start")
                        control_end = gr.Slider(0, 1, value=1.0, step=0.01, label="Control end")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="cnx-seed")
                        randomize = gr.Checkbox(value=False, label="Random seed")
                        batch = gr.Slider(1, limits.max_batch, value=1, step=1, label="Batch size")
                    with gr.Row():
                        width = gr.Slider(
                            limits.min_side, step=8, label="Width", elem_id="cnx-width",
                            **app.size_slider(first, first.width),
                        )  # fmt: skip
                        height = gr.Slider(
                            limits.min_side, step=8, label="Height", elem_id="cnx-height",
                            **app.size_slider(first, first.height),
                        )  # fmt: skip
                    run = gr.Button("Generate", variant="primary", elem_id="cnx-generate")
                with gr.Column(scale=1):
                    gallery = gr.Gallery(
                        label="Condition and results",
                        columns=3,
                        height="auto",
                        object_fit="contain",
                        buttons=["download", "fullscreen"],
                        elem_id="cnx-gallery",
                    )
                    info = gr.Markdown(elem_id="cnx-info")
                    files = gr.File(label="Download results (PNG with settings)", file_count="multiple")
                    with gr.Accordion("Reproduce from a result PNG", open=False):
                        settings_png = gr.File(
                            label="Result PNG", file_types=[".png"], type="filepath", elem_id="cnx-settings-png"
                        )
                        load_settings = gr.Button("Load settings")
                    gr.Markdown(
                        f"Limits: uploads up to {limits.max_upload_mb:g} MB and {limits.max_upload_pixels / 1e6:.1f} "
                        f"MP; outputs {limits.min_side}-{limits.max_side} px (or the model's own size); batch up to "
                        f"{limits.max_batch}; {limits.max_steps} steps; {limits.max_seconds:g} s per request. One "
                        "generation runs at a time; others wait in the queue."
                    )
        with gr.Tab("Video"):
            app.video = build_video_tab(config, app.uploads, app.stop_reason)

        # Events pass the App handlers their parameters by name: gradio gives each event one {component: value}
        # dict (set inputs), and the handler's "options" parameter gets the selected preprocessor's option widgets.
        fields = dict(preset=preset, preset_info=preset_info, base=base, control=control, lora=lora,
                      lora_weight=lora_weight, upload=upload, preprocessor=preprocessor, fit=fit, prompt=prompt,
                      negative=negative, steps=steps, guidance=guidance, control_scale=control_scale,
                      control_start=control_start, control_end=control_end, seed=seed, randomize=randomize,
                      batch=batch, width=width, height=height)  # fmt: skip
        names = {c: n for n, c in fields.items()} | widgets.names()

        def inputs(handler: Callable) -> set:  # for the handlers that take options
            return {fields[n] for n in _parameters(handler) if n != "options"} | set(widgets.components)

        def arguments(handler: Callable, data: dict) -> dict[str, Any]:
            kwargs = {n: data[fields[n]] for n in _parameters(handler) if n != "options"}
            return kwargs | {"options": widgets.options(kwargs["preprocessor"], data)}

        def outputs(order: tuple[str, ...]) -> list:
            return [fields[n] for n in order if n != "options"] + widgets.components

        def returned(order: tuple[str, ...], values: tuple) -> dict:
            named = dict(zip(order, values, strict=True))
            return {fields[n]: v for n, v in named.items() if n != "options"} | widgets.updates(named["options"])

        # The closures keep the handlers' names: they are the events' API names.
        def on_preview(data: dict, request: gr.Request | None = None):
            return app.on_preview(**arguments(app.on_preview, data), request=request)

        def on_generate(data: dict, progress=gr.Progress(track_tqdm=True)):
            return app.on_generate(**arguments(app.on_generate, data), progress=progress)

        def on_preset(label: str):
            return returned(App.PRESET_FIELDS, app.on_preset(label))

        def on_load_settings(png: Any):
            return returned(App.LOADED_FIELDS, app.on_load_settings(png))

        preview_kwargs = dict(
            fn=on_preview,
            preprocess=False,  # uploads are checked (UploadRecord) and decoded by the app itself
            inputs=inputs(app.on_preview),
            outputs=preview,
            concurrency_limit=2,
            concurrency_id="preview",
            trigger_mode="always_last",
            show_progress="minimal",
        )
        # `change` also fires when "Load settings" restores the condition, and clears the preview on removal;
        # sliders update the preview when they are let go.
        for comp in (upload, preprocessor, fit, *widgets.components, width, height):
            (comp.release if isinstance(comp, gr.Slider) else comp.change)(**preview_kwargs)
        preprocessor.change(widgets.visibility, preprocessor, list(widgets.groups.values()), queue=False)
        preset.change(on_preset, preset, outputs(App.PRESET_FIELDS))
        run.click(
            on_generate,
            inputs(app.on_generate),
            [gallery, files, info, seed],
            concurrency_limit=1,
            concurrency_id="generate",
            api_name="generate",
            preprocess=False,
        )
        load_settings.click(on_load_settings, settings_png, outputs(App.LOADED_FIELDS), preprocess=False)
        app.api_inputs = {
            api: [names[c] for c in sorted(inputs(handler), key=lambda c: c._id)]  # gradio's order for set inputs
            for api, handler in (("on_preview", app.on_preview), ("generate", app.on_generate))
        }
    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    app.uploads.bind(demo)
    demo.controlnext_app = app  # for tests and embedding
    return demo


def launch(config: WebConfig, block: bool = True, **kwargs: Any) -> tuple[gr.Blocks, str, str | None]:
    """Serve the app with the config's safety settings; returns (the gradio Blocks, local URL, share URL or None).

    With ``block=False`` the server runs in a background thread (stop it with ``blocks.close()``).
    """
    from starlette.middleware import Middleware

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reporting from a local tool
    config.outputs.mkdir(parents=True, exist_ok=True)
    demo = build_app(config)
    sites: set[str] = set()  # other names of this server that its own pages may post from (the share link)
    _, local_url, share_url = demo.launch(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        max_file_size=config.limits.max_file_size,
        allowed_paths=[str(config.outputs)],
        show_error=not config.exposed,  # unexpected errors' text only for a local-only app
        ssr_mode=False,
        prevent_thread_lock=True,  # blocks below, once the share link's name is known
        css=CSS,
        footer_links=["settings"],
        app_kwargs={"middleware": [Middleware(SameSiteMiddleware, sites=sites)]},
        quiet=kwargs.pop("quiet", False),
        **kwargs,
    )
    if share_url:
        sites.add(urlsplit(share_url).netloc.lower())
    if block:
        demo.block_thread()
    return demo, local_url, share_url


def describe(config: WebConfig) -> str:
    """One-paragraph summary of how the app is configured (printed at start-up)."""
    return json.dumps(
        {
            "host": config.host,
            "share": config.share,
            "custom_model_paths": config.custom_models,
            "outputs": str(config.outputs),
            "models": [s.label for s in config.models],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )


__all__ += ["ALLOWED_IMAGE_SUFFIXES", "describe"]
