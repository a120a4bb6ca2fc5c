"""Measuring tools: step clocks (CUDA events), FLOP counting, peak memory, the machine description."""

from __future__ import annotations

import gc
import os
import platform
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall time of a block of work on ``device``: CUDA events on CUDA (the GPU's own clock), else ``perf_counter``.

    :meth:`start` synchronises first, so work queued before the block is not counted; :meth:`stop` returns seconds.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._t0 = 0.0

    def start(self) -> None:
        _sync(self.device)
        if self.cuda:
            self._events[0].record(torch.cuda.current_stream(self.device))
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = self._events[1]
            end.record(torch.cuda.current_stream(self.device))
            end.synchronize()
            return self._events[0].elapsed_time(end) / 1e3
        return time.perf_counter() - self._t0



def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter():
    """FlopCounterMode that also counts CPU flash attention (torch registers only the CUDA attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextmanager
def peak_new_bytes(device: torch.device) -> Iterator[list[int]]:
    """Yield a one-element list that holds, on exit, the peak of bytes newly allocated inside the block."""
    out = [0]
    gc.collect()
    if device.type == "meta":
        yield out
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = torch.cuda.max_memory_allocated(device) - start
        return
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))  # negative sizes are frees
        stack.extend(ev.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    out[0] = peak


_peak_new_bytes = peak_new_bytes  # the earlier private name


# ---------------------------------------------------------------------------------------------- machine
def machine_description(device: torch.device) -> str:
    """CPU model and cores, RAM, torch threads, and the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        import psutil

        parts.append(f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    except ImportError:
        pass
    threads = torch.get_num_threads()
    parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    desc = ", ".join(parts)
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)} (host: {desc})"
    return desc


def _versions() -> dict[str, str]:
    import diffusers

    from .. import __version__

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "controlnext": __version__,
        "python": platform.python_version(),
    }


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (any device), for memory measurements.

    Every tensor an operator returns is recorded by its storage; a storage counts until the last tracked tensor
    that uses it is freed. Tensors created before the tracker (model weights, inputs) are not counted. Use::

        with TensorMemoryTracker() as mem:
            pipe(...)
        print(mem.peak_bytes)
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[tuple, list[int]] = {}  # storage key -> [bytes, tracked tensors using it]

    def _release(self, key: tuple) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device.type, t.device.index)
            entry = self._live.get(key)
            if entry is None:
                entry = self._live[key] = [storage.nbytes(), 0]
                self.current_bytes += entry[0]
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


# ---------------------------------------------------------------------- inputs
