"""Shared by the op files: optional Triton import, the input-error type, launch helpers."""
import torch

from lgd.errors import LgdError

try:  # Triton is an optional extra: the ops fall back to their references without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed in CI
    HAS_TRITON = False

# Elements per program tile on a GPU: two fp32 tiles of this size stay in registers.
GPU_TILE = 4096


class KernelInputError(LgdError, ValueError):
    """A fused op was given tensors of the wrong shape, dtype or device, or bad indices."""


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def use_triton(t: torch.Tensor) -> bool:
    """The Triton path is taken for CUDA tensors only; the interpreter is for tests."""
    return HAS_TRITON and t.is_cuda


def num_warps_for(tile: int) -> int:
    return 4 if tile <= 2048 else 8
