"""`controlnext bench`: ControlNeXt vs the base UNet and diffusers ControlNet, side by side in one run.

What one run measures, per row (a model combination) and per guidance mode (UNet batch 1, or 2 with classifier-free
guidance), at the real architecture sizes with randomly initialised weights (nothing is downloaded):

* ``step_seconds``: wall time of one denoising step's model calls (median over the timed steps; on CUDA timed with
  CUDA events, i.e. on the GPU's own clock from the step's first launch to its last kernel), with
  ``overhead`` = the median, over rounds, of (row / base with the same guidance in the same round) - 1. Rows are
  interleaved round-robin (rotating the order every round), so load from other processes hits all rows alike;
* ``step_cpu_seconds`` / ``cpu_overhead``: the same with process CPU time, which other processes disturb less;
* ``control_cpu_seconds`` / ``control_share`` (CPU runs): CPU time spent inside the control path itself (the
  adapter's hooks, timed by clock hooks placed around them; ControlNet's forward call), and its share of the base step;
* ``flops_per_step`` (``torch.utils.flop_counter.FlopCounterMode``, attention included) and ``prepare_flops`` (the
  once-per-generation work, e.g. ControlNeXt's cached timestep-independent prefix), counted once in an untimed step;
* ``peak_mem_bytes``: the weights of every model the row uses plus the peak of bytes newly allocated from the start of
  a generation (attaching, encoding the prefix, duplicating conditions) to the end of a step. CUDA: from
  ``torch.cuda.max_memory_allocated``; CPU: from the profiler's allocation events (``tracemalloc`` cannot see torch's
  allocator and RSS deltas are blurred by the system allocator), i.e. the CPU analogue of ``max_memory_allocated``.
  Measured in its own untimed step (the FLOP counter's dispatch mode would turn in-place ops into copies);
* ``added_params`` / ``trainable_params``: parameters added to the base, and those trained by the published recipe
  (the module plus the UNet subset it fine-tunes; all of ControlNet).

Rows: ``base`` (the UNet alone), ``controlnext`` (the 3.5M-parameter layout of the family: ``sd15-training`` or
``sdxl``, through :func:`controlnext.attach` with the cached prefix and guidance de-duplication, as the pipelines use
it), ``controlnext-sd15-release`` (the 5.35M ``sd15`` release layout), ``controlnet``
(``ControlNetModel.from_unet(unet)``, called as diffusers' pipelines do: ControlNet, then the UNet with its residuals,
the condition duplicated for guidance). Use :func:`run_benchmark` or ``controlnext bench``.

The transformer presets (``sd3-1024``, ``flux-1024`` and their CPU-sized ``sd3-512``, ``flux-512-shallow``) build the
published SD3-medium / Flux.1-dev transformers; their ``controlnext`` row is the family's token layout and their
``controlnet`` row diffusers' ``SD3ControlNetModel`` / ``FluxControlNetModel`` at the layer counts of the InstantX
checkpoints, run as ``StableDiffusion3ControlNetPipeline`` / ``FluxControlNetPipeline`` run them. Flux.1-dev is
guidance-distilled: its presets have no CFG rows.

With ``compile`` set (a ``torch.compile`` backend, e.g. ``inductor``), each row is compiled with its hooks in place and
timed on its own, rows one after the other: dynamo does not guard on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph compiled for one row would silently be reused by a
row with different hooks; the compiled code is reset between rows. ``compile_seconds``
is the time of the first call and the warm-up calls (where compiling and the one expected recompilation happen) minus
as many steady steps; a recompilation during the timed steps is an error (the timing would include compiling).

Modules: ``presets`` (named settings; plain data, no torch), ``results`` (settings and result records), ``models``
(random-weight models and inputs), ``rows`` (what each row runs), ``measure`` (clocks, FLOPs, peak memory, machine),
``runner`` (the interleaved runs), ``report`` (terminal table and the docs' markdown section). Names are imported on
first use, so listing presets imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "BenchConfig",
    "BenchResult",
    "PRESETS",
    "Preset",
    "ROW_NAMES",
    "RowResult",
    "StepClock",
    "TensorMemoryTracker",
    "build_controlnet",
    "build_controlnext",
    "build_random",
    "build_unet",
    "command_line",
    "machine_description",
    "make_inputs",
    "peak_new_bytes",
    "render_markdown",
    "render_table",
    "round_overheads",
    "run_benchmark",
    "update_docs",
]

_LAZY = {
    "TensorMemoryTracker": "measure",
    "BenchConfig": "results",
    "BenchResult": "results",
    "DEFAULT_ROWS": "presets",
    "DTYPES": "results",
    "PRESETS": "presets",
    "Preset": "presets",
    "ROW_NAMES": "presets",
    "RowResult": "results",
    "SCHEDULE_STEPS": "presets",
    "StepClock": "measure",
    "TEXT_TOKENS": "presets",
    "_COLUMNS": "report",
    "_ControlNeXtRow": "rows",
    "_ControlNetRow": "rows",
    "_Inputs": "models",
    "_Row": "rows",
    "_TransformerControlNetRow": "rows",
    "controlnet_row": "rows",
    "_bracket_hooks": "rows",
    "_compiled_rounds": "runner",
    "_count": "rows",
    "_cpu_sdpa_flops": "measure",
    "_flop_counter": "measure",
    "_fmt_bytes": "report",
    "_fmt_control": "report",
    "_fmt_flops": "report",
    "_fmt_overhead": "report",
    "_fmt_params": "report",
    "_fmt_pct": "report",
    "_fmt_s": "report",
    "_peak_new_bytes": "measure",
    "_progress": "runner",
    "_relate": "runner",
    "_summarise": "runner",
    "_sync": "measure",
    "_timed_rounds": "runner",
    "_versions": "measure",
    "_weight_bytes": "rows",
    "build_controlnet": "models",
    "build_controlnext": "models",
    "build_random": "models",
    "build_unet": "models",
    "command_line": "runner",
    "machine_description": "measure",
    "make_inputs": "models",
    "peak_new_bytes": "measure",
    "render_markdown": "report",
    "render_table": "report",
    "round_overheads": "report",
    "run_benchmark": "runner",
    "section_key": "report",
    "update_docs": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
