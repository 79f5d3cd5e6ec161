"""Shared by the op files: optional Triton import, the input-error type, launch helpers, and the
flash-attention tolerance rule that the tests and the GPU check judge every kernel by."""
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


def num_warps_for(tile: int) -> int:
    return 4 if tile <= 2048 else 8


LOW_PRECISION = (torch.bfloat16, torch.float16)


def flash_rule(fast: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype,
               atol: float = 1e-5) -> tuple[float, float]:
    """(max error, bound) of a fused kernel's output against its fp32 twin, by the rule of
    flash-attention's tests: fp32 inputs must match tightly (atol + 1e-5 x the largest value);
    bf16/fp16 inputs within twice the error of the twin run natively in that precision
    (ref_lowp) plus atol, where atol also admits one ulp of rounding the result to a
    low-precision output (PyTorch's own max error can miss that by luck on a few big entries)."""
    fast_dtype = fast.dtype
    fast, ref_fp32 = fast.double(), ref_fp32.double()
    err = (fast - ref_fp32).abs().max().item()
    scale = ref_fp32.abs().max().item()
    if dtype == torch.float32:
        return err, atol + 1e-5 * scale
    if fast_dtype in LOW_PRECISION:
        atol += torch.finfo(fast_dtype).eps * scale
    return err, 2 * (ref_lowp.double() - ref_fp32).abs().max().item() + atol
