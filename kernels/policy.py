"""Which implementation each fused op runs: one policy for every kernel in lgd.kernels.

Modes (the config field `sampling.kernels`; the environment variable LGD_KERNELS overrides it):

    auto   a fused kernel runs only where it is validated for the device: the C++ ops
           (learnability, norm_relu_pool) on CPU (built and tested with the package), a
           Triton kernel on a CUDA GPU only if `validated.json` (next to this file) records a
           GPU check of that kernel (benchmarks/gpu_check.py --record) on a GPU of the same
           compute capability that found it correct at the real shapes and faster than what
           inductor makes of the plain ops. Everything else runs the plain torch twin, which
           torch.compile fuses itself.
    fused  every fused kernel the device has: Triton on CUDA, the C++ ops on CPU.
    torch  the plain torch twins everywhere.

The reference sampling engine always runs `torch`. Call sites ask `backend(kernel, device)`
at call time; `kernel_mode(mode)` sets the mode for a block (a run, a benchmark, a test).
The decision is a lookup in module state, so torch.compile guards on it like any global.
"""
from __future__ import annotations

import contextlib
import json
import os
from importlib import resources

import torch

from lgd import _ops
from lgd.errors import ConfigError

from ._common import HAS_TRITON

KERNELS = ("adaln_norm", "group_norm_silu", "learnability", "norm_relu_pool")
MODES = ("auto", "fused", "torch")
ENV = "LGD_KERNELS"
CPU_KERNELS = ("learnability", "norm_relu_pool")  # the fused ops with a C++ CPU op (csrc/)
GPU_KERNELS = ("adaln_norm", "group_norm_silu", "learnability")  # the fused ops with a Triton kernel


def resolve_mode(configured: str = "auto") -> str:
    """The mode in force: $LGD_KERNELS if set, else the configured one; both must be valid."""
    mode = os.environ.get(ENV, "").strip() or configured
    if mode not in MODES:
        where = f"the environment variable {ENV}" if os.environ.get(ENV, "").strip() else "sampling.kernels"
        raise ConfigError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def validated_record() -> dict[str, list[dict]]:
    """kernel name -> the recorded GPU checks that passed (empty until a GPU check is recorded)."""
    text = resources.files("lgd.kernels").joinpath("validated.json").read_text()
    return json.loads(text).get("kernels", {})


_mode: str | None = None  # None: resolve_mode() at the first call
_validated: dict[str, set[str]] | None = None  # kernel -> compute capabilities "major.minor"
_capabilities: dict[int, str] = {}


def _capability(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        major, minor = torch.cuda.get_device_capability(index)
        _capabilities[index] = f"{major}.{minor}"
    return _capabilities[index]


def _validated_on(kernel: str, device: torch.device) -> bool:
    global _validated
    if _validated is None:
        _validated = {k: {str(entry["capability"]) for entry in entries}
                      for k, entries in validated_record().items()}
    return _capability(device) in _validated.get(kernel, ())


def current_mode() -> str:
    global _mode
    if _mode is None:
        _mode = resolve_mode()
    return _mode


def backend(kernel: str, device: torch.device | str) -> str:
    """"triton", "cpp" or "torch": what `kernel` runs on `device` under the current mode."""
    device = torch.device(device)
    mode = current_mode()
    if mode == "torch":
        return "torch"
    if device.type == "cuda":
        if not HAS_TRITON or kernel not in GPU_KERNELS:
            return "torch"
        return "triton" if mode == "fused" or _validated_on(kernel, device) else "torch"
    if device.type == "cpu" and kernel in CPU_KERNELS:
        if _ops.has_op(kernel):
            return "cpp"
        _ops.warn_missing_once(kernel)
    return "torch"


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Run a block under `mode` (already resolved: pass resolve_mode(config value) to honour
    $LGD_KERNELS); the previous mode comes back afterwards. On CUDA the device capabilities are
    read here, outside any compiled region."""
    global _mode
    if mode not in MODES:
        raise ConfigError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            _capability(torch.device("cuda", index))
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def status(device: torch.device | str) -> dict[str, str]:
    """kernel -> backend on `device` under the current mode (for logs and the GPU check)."""
    return {kernel: backend(kernel, device) for kernel in KERNELS}
