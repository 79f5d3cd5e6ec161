"""GroupNorm followed by SiLU, fused: y = silu(GN(x) * weight + bias).

Why this fusion: every ResNet block of the VAE decoder (and its output head) runs GroupNorm
then SiLU, and the guided step differentiates through the decoder. In the profile of an LGD
step GroupNorm+SiLU forward and backward took ~28 % of the time; unfused, each pair reads and
writes the full activation four times (GN out, SiLU out, and again in backward). The fused
kernels read x once per pass and never store the GN output: backward recomputes it from the
saved per-group mean and rstd.

x is [B, C, *spatial] (contiguous NC...); weight and bias are [C] or None; C % groups == 0.
Statistics and math are fp32 whatever the input dtype; y has x's dtype. First-order only:
the decoder is never double-differentiated (IGD's double backward is in the classifier).

Layout as in adaln_norm: Triton kernels, `triton_op` launchers, the autograd.Function, the
reference twin, the public dispatch `group_norm_silu` and the drop-in module `GroupNormSiLU`.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import policy
from ._common import FLOAT_DTYPES, HAS_TRITON, KernelInputError, next_pow2, num_warps_for

# Elements of one group handled per loop iteration on a GPU.
GPU_BLOCK = 1024


def group_norm_silu_reference(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float = 1e-5, *, upcast: bool = True,
) -> torch.Tensor:
    """Plain torch twin. upcast=True computes in fp32 (the fused op's semantics); upcast=False
    runs in the input dtype, which measures PyTorch's own low-precision error in tests."""
    dtype = x.dtype
    if upcast:
        x = x.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    return F.silu(F.group_norm(x, groups, weight, bias, eps)).to(dtype)


def _check(x: torch.Tensor, groups: int, weight, bias) -> None:
    if x.dim() < 2:
        raise KernelInputError(f"group_norm_silu: x must be [B, C, ...], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if groups < 1 or C % groups:
        raise KernelInputError(f"group_norm_silu: {C} channels do not split into {groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (C,):
            raise KernelInputError(f"group_norm_silu: {name} must be [C] = [{C}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise KernelInputError(f"group_norm_silu: {name} is on {t.device}, x on {x.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"group_norm_silu: {name} must be fp32/bf16/fp16, got {t.dtype}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"group_norm_silu: x must be fp32/bf16/fp16, got {x.dtype}")


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _group(pid, G, C, CPG, HW):
        """Program pid = (n, g): sample n, group g; its CPG * HW elements start at `base`."""
        n = pid // G
        g = pid % G
        return n, g, CPG * HW, (n * C + g * CPG).to(tl.int64) * HW

    @triton.jit
    def _silu_grad(dy, z):
        """dy * d silu(z) / dz."""
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))

    @triton.jit
    def _gn_silu_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
        C, HW, CPG, G, eps,
        BLOCK: tl.constexpr,
    ):
        # Program (n, g): the CPG * HW contiguous elements of group g of sample n.
        # Two passes for the statistics (mean, then centred variance: no cancellation), one to write.
        pid = tl.program_id(0)
        n, g, size, base = _group(pid, G, C, CPG, HW)
        offs = tl.arange(0, BLOCK)

        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            m = start + offs < size
            acc += tl.load(x_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / size
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            m = start + offs < size
            xc = tl.load(x_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32) - mean
            acc += tl.where(m, xc * xc, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / size + eps)

        for start in range(0, size, BLOCK):
            idx = start + offs
            m = idx < size
            c = g * CPG + idx // HW
            x = tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=m, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
            z = (x - mean) * rstd * w + b
            y = z / (1.0 + tl.exp(-z))
            tl.store(y_ptr + base + idx, y.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

    @triton.jit
    def _gn_silu_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
        C, HW, CPG, G,
        BLOCK: tl.constexpr,
    ):
        # dz = dy * silu'(z), z recomputed from x; dxhat = dz * w.
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group.
        # dw, db sum over samples too: each program writes its group's per-channel partial sums
        # to [B, C] and the launcher adds the B rows.
        pid = tl.program_id(0)
        n, g, size, base = _group(pid, G, C, CPG, HW)
        offs = tl.arange(0, BLOCK)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)

        sum_dxhat = tl.zeros([BLOCK], dtype=tl.float32)
        sum_dxhat_xhat = tl.zeros([BLOCK], dtype=tl.float32)
        for c_local in range(0, CPG):
            c = g * CPG + c_local
            w = tl.load(w_ptr + c).to(tl.float32)
            b = tl.load(b_ptr + c).to(tl.float32)
            dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, HW, BLOCK):
                m = start + offs < HW
                at = base + c_local * HW + start + offs
                xhat = (tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32) - mean) * rstd
                dy = tl.load(dy_ptr + at, mask=m, other=0.0).to(tl.float32)
                dz = tl.where(m, _silu_grad(dy, xhat * w + b), 0.0)
                dw_acc += dz * xhat
                db_acc += dz
                sum_dxhat += dz * w
                sum_dxhat_xhat += dz * w * xhat
            tl.store(dw_part_ptr + n * C + c, tl.sum(dw_acc, axis=0))
            tl.store(db_part_ptr + n * C + c, tl.sum(db_acc, axis=0))
        c1 = tl.sum(sum_dxhat, axis=0) / size
        c2 = tl.sum(sum_dxhat_xhat, axis=0) / size

        for start in range(0, size, BLOCK):
            idx = start + offs
            m = idx < size
            c = g * CPG + idx // HW
            xhat = (tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(dy_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=m, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
            dxhat = _silu_grad(dy, xhat * w + b) * w
            dx = (dxhat - c1 - xhat * c2) * rstd
            tl.store(dx_ptr + base + idx, dx.to(dx_ptr.dtype.element_ty), mask=m)

    def _layout(x: torch.Tensor) -> tuple[int, int, int]:
        """(B, C, elements per channel) of a contiguous [B, C, *spatial] tensor."""
        B, C = x.shape[:2]
        return B, C, x.numel() // (B * C)

    def _fp32_rows(B: int, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty((B, n), device=like.device, dtype=torch.float32)

    @triton_op("lgd::group_norm_silu_fwd", mutates_args=())
    def _gn_silu_fwd(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, block: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        B, C, HW = _layout(x)
        y, mean, rstd = torch.empty_like(x), _fp32_rows(B, groups, x), _fp32_rows(B, groups, x)
        wrap_triton(_gn_silu_fwd_kernel)[(B * groups,)](
            x, weight, bias, y, mean, rstd, C, HW, C // groups, groups, eps,
            BLOCK=block, num_warps=num_warps_for(block),
        )
        return y, mean, rstd

    @triton_op("lgd::group_norm_silu_bwd", mutates_args=())
    def _gn_silu_bwd(
        dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        mean: torch.Tensor, rstd: torch.Tensor, groups: int, block: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dy, x = dy.contiguous(), x.contiguous()
        B, C, HW = _layout(x)
        dx, dw_part, db_part = torch.empty_like(x), _fp32_rows(B, C, x), _fp32_rows(B, C, x)
        wrap_triton(_gn_silu_bwd_kernel)[(B * groups,)](
            dy, x, weight, bias, mean, rstd, dx, dw_part, db_part, C, HW, C // groups, groups,
            BLOCK=block, num_warps=num_warps_for(block),
        )
        return dx, dw_part.sum(0), db_part.sum(0)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, block):
        y, mean, rstd = torch.ops.lgd.group_norm_silu_fwd(x, weight, bias, groups, eps, block)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.block = groups, block
        return y

    @staticmethod
    @once_differentiable  # a double backward raises instead of silently returning wrong values
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.lgd.group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.block)
        return dx, dw.to(weight.dtype), db.to(bias.dtype), None, None, None


def group_norm_silu_triton(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-5, block: int | None = None,
) -> torch.Tensor:
    """The Triton path on any device Triton accepts (CUDA; CPU tensors under TRITON_INTERPRET=1).
    block: elements per loop iteration (None = GPU default); tests use small ones so that the
    loops over a group run several iterations."""
    if not HAS_TRITON:
        raise RuntimeError("group_norm_silu_triton needs triton, which is not importable")
    _check(x, groups, weight, bias)
    C = x.shape[1]
    # No affine: unit weight, zero bias (their gradients are then discarded by autograd).
    weight = torch.ones(C, device=x.device, dtype=x.dtype) if weight is None else weight
    bias = torch.zeros(C, device=x.device, dtype=x.dtype) if bias is None else bias
    return _GroupNormSiLU.apply(x, weight, bias, groups, eps, next_pow2(block or GPU_BLOCK))


def group_norm_silu(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """silu(group_norm(x, groups, weight, bias, eps)), fp32 statistics.
    The fused Triton kernels where the kernel policy (lgd.kernels.policy) says so (first-order
    only: a double backward through them raises), else the plain reference."""
    _check(x, groups, weight, bias)
    if policy.backend("group_norm_silu", x.device) == "triton":
        return group_norm_silu_triton(x, groups, weight, bias, eps)
    return group_norm_silu_reference(x, groups, weight, bias, eps)


class GroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm whose forward also applies SiLU, through `group_norm_silu`.
    Same parameters and state_dict keys as the GroupNorm it replaces."""

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        fused = cls.__new__(cls)
        fused.__dict__.update(norm.__dict__)  # shares the parameters, keeps every attribute
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
