"""adaLN-modulated LayerNorm, fused: y = LN(x) * (1 + scale) + shift.

LN has no affine weights and eps = 1e-6 (the DiT block input). x is [B, T, D]; shift and
scale are [B, D] and broadcast over the T tokens. Statistics and math are fp32 whatever the
input dtype; y has x's dtype.

Layout (Liger style): Triton kernels, launch wrappers registered as `torch.library.triton_op`
(so torch.compile sees through them), the autograd.Function, the plain reference twin and the
public dispatch `adaln_modulate`.
"""
import torch
import torch.nn.functional as F

from . import policy
from ._common import FLOAT_DTYPES, GPU_TILE, HAS_TRITON, KernelInputError, next_pow2, num_warps_for

EPS = 1e-6


def adaln_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = EPS, *, upcast: bool = True
) -> torch.Tensor:
    """Plain torch twin. upcast=True computes in fp32 (the fused op's semantics); upcast=False
    runs in the input dtype, which measures PyTorch's own low-precision error in tests."""
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.float(), shift.float(), scale.float()
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]
    return y.to(dtype)


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 3:
        raise KernelInputError(f"adaln_modulate: x must be [B, T, D], got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[2])
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != want:
            raise KernelInputError(
                f"adaln_modulate: {name} must be [B, D] = {list(want)} for x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise KernelInputError(f"adaln_modulate: {name} is on {t.device}, x on {x.device}")
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        if t.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"adaln_modulate: {name} must be fp32/bf16/fp16, got {t.dtype}")


def launch_config(T: int, D: int) -> tuple[int, int]:
    """(block_m, block_d) for a GPU: whole rows of D, enough rows to fill one tile."""
    block_d = next_pow2(D)
    return max(1, min(next_pow2(T), GPU_TILE // block_d)), block_d


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _tile(b, tb, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows tb*BLOCK_M.. of batch item b, whole rows: columns, masks and flat offsets."""
        rows = tb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        col_ok = cols < D
        flat_rows = (b * T + rows).to(tl.int64)
        return cols, col_ok, row_ok, row_ok[:, None] & col_ok[None, :], flat_rows, flat_rows[:, None] * D + cols[None, :]

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr,
        T, D, eps,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (b, j): rows j*BLOCK_M.. of batch item b, each row whole (BLOCK_D >= D).
        b = tl.program_id(0)
        cols, col_ok, row_ok, mask, flat_rows, offs = _tile(b, tl.program_id(1), T, D, BLOCK_M, BLOCK_D)

        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        shift = tl.load(shift_ptr + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + flat_rows, mean, mask=row_ok)
        tl.store(rstd_ptr + flat_rows, rstd, mask=row_ok)

    @triton.jit
    def _adaln_bwd_kernel(
        dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
        T, D, NUM_TB,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # dx is per row; dshift/dscale sum over T, so each program writes its partial sum
        # over its rows to [B, NUM_TB, D] and the launcher adds the NUM_TB partials.
        b = tl.program_id(0)
        tb = tl.program_id(1)
        cols, col_ok, row_ok, mask, flat_rows, offs = _tile(b, tb, T, D, BLOCK_M, BLOCK_D)

        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + flat_rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + flat_rows, mask=row_ok, other=0.0)
        scale = tl.load(scale_ptr + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * (1.0 + scale[None, :])  # dL/dxhat
        c1 = tl.sum(xhat * g, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        part = (b * NUM_TB + tb) * D + cols
        tl.store(dshift_part_ptr + part, tl.sum(dy, axis=0), mask=col_ok)
        tl.store(dscale_part_ptr + part, tl.sum(dy * xhat, axis=0), mask=col_ok)

    @triton_op("lgd::adaln_modulate_fwd", mutates_args=())
    def _adaln_fwd(
        x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, block_m: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        B, T, D = x.shape
        block_d = next_pow2(D)
        y = torch.empty_like(x)
        mean = torch.empty((B, T), device=x.device, dtype=torch.float32)
        rstd = torch.empty((B, T), device=x.device, dtype=torch.float32)
        grid = (B, triton.cdiv(T, block_m))
        wrap_triton(_adaln_fwd_kernel)[grid](
            x, shift, scale, y, mean, rstd, T, D, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps_for(block_m * block_d),
        )
        return y, mean, rstd

    @triton_op("lgd::adaln_modulate_bwd", mutates_args=())
    def _adaln_bwd(
        dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor, block_m: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
        B, T, D = x.shape
        block_d = next_pow2(D)
        num_tb = triton.cdiv(T, block_m)
        dx = torch.empty_like(x)
        dshift_part = torch.empty((B, num_tb, D), device=x.device, dtype=torch.float32)
        dscale_part = torch.empty((B, num_tb, D), device=x.device, dtype=torch.float32)
        wrap_triton(_adaln_bwd_kernel)[(B, num_tb)](
            dy, x, scale, mean, rstd, dx, dshift_part, dscale_part, T, D, num_tb,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps_for(block_m * block_d),
        )
        return dx, dshift_part.sum(1), dscale_part.sum(1)


class _AdaLNModulate(torch.autograd.Function):
    """First-order only: the DiT needs no double backward (docs/measured-facts.md)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, block_m):
        y, mean, rstd = torch.ops.lgd.adaln_modulate_fwd(x, shift, scale, eps, block_m)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.block_m = block_m
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.lgd.adaln_modulate_bwd(dy, x, scale, mean, rstd, ctx.block_m)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None


def adaln_modulate_triton(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = EPS,
    block_m: int | None = None,
) -> torch.Tensor:
    """The Triton path on any device Triton accepts (CUDA; CPU tensors under TRITON_INTERPRET=1).
    block_m: rows per program (None = GPU heuristic); tests use a large one to keep the
    interpreter's program count small."""
    if not HAS_TRITON:
        raise RuntimeError("adaln_modulate_triton needs triton, which is not importable")
    _check(x, shift, scale)
    if block_m is None:
        block_m, _ = launch_config(x.shape[1], x.shape[2])
    return _AdaLNModulate.apply(x, shift, scale, eps, next_pow2(block_m))


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """y = LayerNorm(x, no affine) * (1 + scale[:, None]) + shift[:, None], fp32 math.
    The fused Triton kernels where the kernel policy (lgd.kernels.policy) says so, else the
    plain reference."""
    _check(x, shift, scale)
    if policy.backend("adaln_norm", x.device) == "triton":
        return adaln_modulate_triton(x, shift, scale, eps)
    return adaln_modulate_reference(x, shift, scale, eps)
