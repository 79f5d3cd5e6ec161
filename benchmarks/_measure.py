"""What the guided-sampling benchmarks measure besides time: FLOPs, peak memory, profiles, and
the environment every benchmark records.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention,
forward and backward (elementwise ops, norms and softmax count zero: the model-FLOPs
convention of nanoGPT/gpt-fast MFU figures).

Peak memory, two views of one run:
  rss_peak    the process's resident-set high-water mark (VmHWM) minus its resident set just
              before the run, after gc + malloc_trim(0) returned freed heap pages to the OS and
              writing "5" to /proc/self/clear_refs reset the high-water mark. Everything the
              step touches counts (torch tensors, oneDNN scratch, allocator slack).
  alloc_peak  the peak of live bytes that torch's CPU allocator handed out during the run,
              replayed from the allocation events of torch.profiler(profile_memory=True).
(tracemalloc sees only Python objects, not tensor storage, so it is not used.)

Peak memory without running (`live_peak`): on the meta device, the high-water mark of the
storages that ops create, each counted while it lives (a weakref on the storage) -- the
activations autograd saves and the transients of forward and backward, not the weights or
inputs made before the run. What a GPU's caching allocator adds on top (fragmentation,
workspaces) is not in it.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import time
import weakref
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop, sdpa_flop

aten = torch.ops.aten


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """convolution_backward with grouped convolutions counted right. torch 2.13's formula counts
    the weight gradient of a grouped conv `groups` times over (it transposes batch and channels
    and ignores groups), which made vmap's per-sample gradients (groups = batch) look quadratic
    in the batch. A weight gradient costs what the forward costs; the input gradient is torch's."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


# Formulas FlopCounterMode lacks or gets wrong. On CPU F.scaled_dot_product_attention runs the
# two *_for_cpu ops, which torch 2.13 counts as zero; its registered SDPA formulas are already
# shape-wrapped and custom ones get wrapped again, so pass the unwrapped originals (same
# argument order as the CPU ops' schemas).
FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
    aten.convolution_backward: conv_backward_flops,
}
# Top-level module class names -> the part of a guided step they belong to; anything else
# seen at the top level is the codec (diffusers' Decoder and post_quant_conv).
PARTS = {"DiT": "dit", "ConvNet": "classifiers", "ResNet": "classifiers"}


def time_first_call(benchmark, fn: Callable[[], object]) -> None:
    """Run fn once (for a compiled provider: compiling) and record its wall time as first_call_s."""
    start = time.perf_counter()
    fn()
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """Run fn once under FlopCounterMode -> {"total", "dit", "codec", "classifiers", "other"};
    "other" is what ran outside any module (e.g. functional parameter-gradient algebra)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    parts = {"dit": 0, "codec": 0, "classifiers": 0}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and "." not in name:
            parts[PARTS.get(name, "codec")] += sum(ops.values())
    total = counter.get_total_flops()
    return {"total": total, **parts, "other": total - sum(parts.values())}


# ---------------------------------------------------------------------------------------------
# Memory and profile


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _allocator_peak(prof) -> int:
    """Peak of the running sum of torch CPU allocation events (+alloc, -free) during the run."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def top_ops(prof, count: int = 15) -> list[dict]:
    """The ops of a profiled run by self CPU time."""
    averages = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    averages.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in averages[:count]]


class _LiveStorage(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def live_peak(fn: Callable[[], object]) -> int:
    """Bytes: the peak of tensor storage created and alive at once while fn runs (see the docstring)."""
    gc.collect()
    with _LiveStorage() as counter:
        fn()
    return counter.peak


def memory_and_profile(fn: Callable[[], object]) -> dict:
    """Run fn once under torch.profiler; peak memory (both views) and the top ops by self CPU time."""
    gc.collect()
    _trim_heap()
    base = _status_bytes("VmRSS")
    exact = _reset_high_water_mark()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    high = _status_bytes("VmHWM")
    return {
        "rss_peak": high - base if exact else None,
        "alloc_peak": _allocator_peak(prof),
        "rss_base": base,
        "top_ops": top_ops(prof),
        "profiled_cpu_ms": round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3, 1),
    }


# ---------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())
        return float(match.group(1)) if match else None
    except OSError:
        return None


def environment() -> dict:
    """Recorded by every benchmark; the load average says how busy the shared machine was."""
    import diffusers

    from lgd import _ops

    return {
        "device": "cpu", "dtype": "float32", "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
        "learnability_op": "cpp" if _ops.has_op("learnability") else "torch",
    }
