"""Instance norm -> ReLU -> k x k mean pooling, fused: ConvNet's block after its convolution.

    y = mean_pool_k(relu(group_norm(x, groups=C) * weight + bias))

Why this fusion: on CPU the classifier trainings are most of a run, and inductor's kernels for
these three ops (forward and backward) read the activation several times over the whole
micro-batch. The C++ op (csrc/norm_relu_pool.cpp) handles one sample at a time, so every pass
finds that sample's activation in cache, and it never stores the normalised or ReLU output:
backward recomputes them from the saved per-(sample, channel) mean and rstd. Measured on one
thread, a micro-batch of 20 at 32 channels: forward and backward 1.0 ms against inductor's
3.0 ms at 32 x 32 px (0.41 vs 0.87 ms at 16 px). Inside the demo's whole compiled training step
the gain is within run-to-run noise (the convolutions, at about the matmul ceiling, are ~65 % of
it); what the op reliably buys is a 35 % shorter cold compile of that step (14 s vs 21 s).

Backends: the C++ op on CPU for float32 and float64 (channels-last outputs, as inductor keeps
the convolutions'); the reference twin everywhere else (CUDA, other dtypes, `kernels: torch`),
which torch.compile fuses itself. First-order only: a double backward raises.

mean_pool is AvgPool2d(k) (stride k, no padding, floor mode) as a reshape and a mean: the same
numbers, but its backward is a broadcast, which inductor fuses better than avg_pool2d's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import policy
from ._common import KernelInputError

CPP_DTYPES = (torch.float32, torch.float64)


def mean_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """AvgPool2d(k) of [N, C, H, W] with stride k and floor mode (k = 1: x itself)."""
    if k == 1:
        return x
    n, c, h, w = x.shape
    x = x[..., : h - h % k, : w - w % k]
    return x.reshape(n, c, h // k, k, w // k, k).mean((3, 5))


def norm_relu_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: int,
                             eps: float = 1e-5) -> torch.Tensor:
    """The plain torch twin: the three ops as ConvNet's block runs them."""
    return mean_pool(F.relu(F.group_norm(x, x.shape[1], weight, bias, eps)), pool)


class _NormReLUPool(torch.autograd.Function):
    # setup_context (not ctx in forward) so that torch.func.grad_and_value, which the compiled
    # training step differentiates with, accepts the Function.
    @staticmethod
    def forward(x, weight, bias, pool, eps):
        return torch.ops.lgd.norm_relu_pool(x, weight, bias, pool, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, pool, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.pool = pool
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    @once_differentiable  # a double backward raises instead of silently returning wrong values
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.lgd.norm_relu_pool_backward(grad_out, x, weight, bias, mean, rstd, ctx.pool)
        return dx, dw, db, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: int) -> None:
    if x.dim() != 4:
        raise KernelInputError(f"norm_relu_pool: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise KernelInputError(f"norm_relu_pool: weight and bias must be [{C}], got "
                               f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if pool < 1:
        raise KernelInputError(f"norm_relu_pool: pool must be >= 1, got {pool}")


def _cpp_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    return x.dtype in CPP_DTYPES and weight.dtype == x.dtype and bias.dtype == x.dtype


def norm_relu_pool_cpp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: int,
                       eps: float = 1e-5) -> torch.Tensor:
    """The C++ op (CPU, float32/float64), differentiable in x, weight and bias."""
    _check(x, weight, bias, pool)
    if x.device.type != "cpu" or not _cpp_dtypes(x, weight, bias):
        raise KernelInputError(f"norm_relu_pool_cpp: CPU tensors of one dtype in {CPP_DTYPES} only, got "
                               f"{x.dtype}/{weight.dtype}/{bias.dtype} on {x.device}")
    return _NormReLUPool.apply(x, weight, bias, pool, eps)[0]


def norm_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: int,
                   eps: float = 1e-5) -> torch.Tensor:
    """Public dispatch: the C++ op where policy.backend selects it and the dtypes allow, else
    the reference twin."""
    if policy.backend("norm_relu_pool", x.device) == "cpp" and _cpp_dtypes(x, weight, bias):
        return norm_relu_pool_cpp(x, weight, bias, pool, eps)
    _check(x, weight, bias, pool)
    return norm_relu_pool_reference(x, weight, bias, pool, eps)


class NormReLUPool(nn.Module):
    """GroupNorm(C, C) -> ReLU -> AvgPool2d(pool) (pool 1: none) as one module, with the
    norm's parameters under the same names (weight, bias), so a model's state loads into it."""

    def __init__(self, channels: int, pool: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.pool, self.eps = pool, eps
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_relu_pool(x, self.weight, self.bias, self.pool, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, pool={self.pool}, eps={self.eps}"
