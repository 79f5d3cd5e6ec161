"""Fused per-sample learnability score (docs/method.md §4), its logit gradients and rank selection.

    S = CE(student, y) - omega * CE(reference, y)
    dS/dstudent   = softmax(student) - onehot(y)
    dS/dreference = -omega * (softmax(reference) - onehot(y))
    winners[g]    = the global index of the first max of S in samples g*kappa .. g*kappa+kappa-1

All math is fp32. ce_student, ce_reference and S are fp32 (selection needs more than bf16's
3 digits); the two gradients have the logits' dtype; winners are int64 indices into N.

Backends: Triton on CUDA, the compiled CPU op `torch.ops.lgd.learnability` (csrc/) if built,
else the plain torch reference. All are wrapped by one autograd.Function so that S is
differentiable w.r.t. both logits with the gradients the forward already produced.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake  # no public equivalent in torch 2.13

from . import policy
from ._common import FLOAT_DTYPES, GPU_TILE, HAS_TRITON, KernelInputError, next_pow2, num_warps_for


class LearnabilityResult(NamedTuple):
    ce_student: torch.Tensor  # [N] fp32
    ce_reference: torch.Tensor  # [N] fp32
    score: torch.Tensor  # [N] fp32, S; the only output that carries autograd
    grad_student: torch.Tensor  # [N, C] dS/dstudent_logits
    grad_reference: torch.Tensor  # [N, C] dS/dreference_logits
    winners: torch.Tensor  # [N // kappa] int64 global sample indices


def learnability_reference(
    student: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, omega: float, kappa: int,
    *, upcast: bool = True,
) -> LearnabilityResult:
    """Plain torch twin (the composition the fused ops replace). upcast=False runs in the
    logits' dtype, which measures PyTorch's own low-precision error in tests."""
    dtype = student.dtype
    if upcast:
        student, reference = student.float(), reference.float()
    logp_s = F.log_softmax(student, dim=-1)
    logp_r = F.log_softmax(reference, dim=-1)
    ce_s = -logp_s.gather(1, labels[:, None]).squeeze(1)
    ce_r = -logp_r.gather(1, labels[:, None]).squeeze(1)
    score = ce_s - omega * ce_r
    onehot = F.one_hot(labels, student.shape[1]).to(logp_s.dtype)
    grad_s = logp_s.exp() - onehot
    grad_r = -omega * (logp_r.exp() - onehot)
    return LearnabilityResult(
        ce_s.float(), ce_r.float(), score.float(), grad_s.to(dtype), grad_r.to(dtype), group_winners(score, kappa)
    )


def group_winners(score: torch.Tensor, kappa: int) -> torch.Tensor:
    """Rank selection: the global index of the highest score in each consecutive group of kappa
    (the first on ties: torch.argmax returns the first maximal index, as the fused kernels do)."""
    local = score.view(-1, kappa).argmax(dim=1)
    return local + torch.arange(0, score.shape[0], kappa, device=score.device)


def launch_config(N: int, C: int) -> tuple[int, int]:
    """(block_m, block_c) for a GPU: column chunks up to 4096, rows to fill one tile."""
    block_c = min(next_pow2(C), GPU_TILE)
    return max(1, min(next_pow2(N), GPU_TILE // block_c)), block_c


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _learnability_kernel(
        s_ptr, r_ptr, labels_ptr, ce_s_ptr, ce_r_ptr, score_ptr, gs_ptr, gr_ptr,
        N, C, omega,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # BLOCK_M rows per program. Pass 1 runs an online log-sum-exp over column chunks and
        # picks the label logit; pass 2 writes the gradients (the re-read hits L2 on a GPU).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        base = rows.to(tl.int64)[:, None] * C
        label = tl.load(labels_ptr + rows, mask=row_ok, other=0)

        # A finite start keeps exp(m_old - m_new) NaN-free for padding rows.
        m_s = tl.full([BLOCK_M], -1e30, tl.float32)
        m_r = tl.full([BLOCK_M], -1e30, tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        l_r = tl.zeros([BLOCK_M], tl.float32)
        t_s = tl.zeros([BLOCK_M], tl.float32)
        t_r = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < C)[None, :]
            hit = cols[None, :] == label[:, None]
            s = tl.load(s_ptr + base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            r = tl.load(r_ptr + base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            new_s = tl.maximum(m_s, tl.max(s, axis=1))
            new_r = tl.maximum(m_r, tl.max(r, axis=1))
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s[:, None]), axis=1)
            l_r = l_r * tl.exp(m_r - new_r) + tl.sum(tl.exp(r - new_r[:, None]), axis=1)
            m_s = new_s
            m_r = new_r
            t_s += tl.sum(tl.where(hit & mask, s, 0.0), axis=1)
            t_r += tl.sum(tl.where(hit & mask, r, 0.0), axis=1)

        lse_s = m_s + tl.log(tl.where(row_ok, l_s, 1.0))
        lse_r = m_r + tl.log(tl.where(row_ok, l_r, 1.0))
        ce_s = lse_s - t_s
        ce_r = lse_r - t_r
        tl.store(ce_s_ptr + rows, ce_s, mask=row_ok)
        tl.store(ce_r_ptr + rows, ce_r, mask=row_ok)
        tl.store(score_ptr + rows, ce_s - omega * ce_r, mask=row_ok)

        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < C)[None, :]
            onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
            offs = base + cols[None, :]
            s = tl.load(s_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            r = tl.load(r_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g_s = tl.exp(s - lse_s[:, None]) - onehot
            g_r = -omega * (tl.exp(r - lse_r[:, None]) - onehot)
            tl.store(gs_ptr + offs, g_s.to(gs_ptr.dtype.element_ty), mask=mask)
            tl.store(gr_ptr + offs, g_r.to(gr_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_argmax_kernel(score_ptr, winners_ptr, G, KAPPA, BLOCK_G: tl.constexpr):
        # Iterative max over the kappa members of BLOCK_G groups at once; strict '>' keeps
        # the first maximum on ties (no tl.sort/topk: far too slow, see docs/measured-facts.md).
        groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        ok = groups < G
        start = groups.to(tl.int64) * KAPPA
        best = tl.load(score_ptr + start, mask=ok, other=0.0)
        arg = tl.zeros([BLOCK_G], tl.int64)
        for j in range(1, KAPPA):
            v = tl.load(score_ptr + start + j, mask=ok, other=0.0)
            better = v > best
            best = tl.where(better, v, best)
            arg = tl.where(better, j, arg)
        tl.store(winners_ptr + groups, start + arg, mask=ok)

    @triton_op("lgd::learnability_triton", mutates_args=())
    def _learnability_triton(
        student: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
        omega: float, kappa: int, block_m: int, block_c: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        student, reference, labels = student.contiguous(), reference.contiguous(), labels.contiguous()
        N, C = student.shape
        f32 = dict(device=student.device, dtype=torch.float32)
        ce_s, ce_r, score = (torch.empty(N, **f32) for _ in range(3))
        grad_s = torch.empty_like(student)
        grad_r = torch.empty_like(reference)
        G = N // kappa
        winners = torch.empty(G, device=student.device, dtype=torch.int64)
        if N == 0:  # an empty grid is not a valid launch
            return ce_s, ce_r, score, grad_s, grad_r, winners
        wrap_triton(_learnability_kernel)[(triton.cdiv(N, block_m),)](
            student, reference, labels, ce_s, ce_r, score, grad_s, grad_r, N, C, omega,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps_for(block_m * block_c),
        )
        block_g = min(next_pow2(G), 1024)
        wrap_triton(_group_argmax_kernel)[(triton.cdiv(G, block_g),)](
            score, winners, G, kappa, BLOCK_G=block_g
        )
        return ce_s, ce_r, score, grad_s, grad_r, winners


def _run(backend: str, student, reference, labels, omega: float, kappa: int, block_m: int, block_c: int):
    if backend == "triton":
        return torch.ops.lgd.learnability_triton(
            student, reference, labels, omega, kappa, block_m, block_c
        )
    if backend == "cpp":
        return torch.ops.lgd.learnability(student, reference, labels, omega, kappa)
    return tuple(learnability_reference(student, reference, labels, omega, kappa))


class _Learnability(torch.autograd.Function):
    """Only S is differentiable: backward = grad_S[:, None] * the saved dS/dlogits."""

    @staticmethod
    def forward(ctx, student, reference, labels, omega, kappa, backend, block_m, block_c):
        outs = _run(backend, student, reference, labels, omega, kappa, block_m, block_c)
        ce_s, ce_r, score, grad_s, grad_r, winners = outs
        ctx.save_for_backward(grad_s, grad_r)
        ctx.mark_non_differentiable(ce_s, ce_r, grad_s, grad_r, winners)
        return ce_s, ce_r, score, grad_s, grad_r, winners

    @staticmethod
    def backward(ctx, _d_ce_s, _d_ce_r, d_score, _d_grad_s, _d_grad_r, _d_winners):
        grad_s, grad_r = ctx.saved_tensors
        d_student = d_reference = None
        if ctx.needs_input_grad[0]:
            d_student = (d_score[:, None] * grad_s).to(grad_s.dtype)
        if ctx.needs_input_grad[1]:
            d_reference = (d_score[:, None] * grad_r).to(grad_r.dtype)
        return d_student, d_reference, None, None, None, None, None, None


def _check(student, reference, labels, kappa: int) -> None:
    if student.dim() != 2:
        raise KernelInputError(f"learnability: logits must be [N, C], got {tuple(student.shape)}")
    if reference.shape != student.shape:
        raise KernelInputError(
            f"learnability: student logits {tuple(student.shape)} and reference logits "
            f"{tuple(reference.shape)} differ in shape"
        )
    N, C = student.shape
    if labels.shape != (N,) or labels.dtype != torch.int64:
        raise KernelInputError(
            f"learnability: labels must be int64 of shape [{N}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if student.dtype not in FLOAT_DTYPES or reference.dtype != student.dtype:
        raise KernelInputError(
            f"learnability: logits must be float32, bfloat16 or float16 and share one dtype, got "
            f"{student.dtype} and {reference.dtype}"
        )
    if not student.device == reference.device == labels.device:
        raise KernelInputError(
            f"learnability: tensors on different devices ({student.device}, "
            f"{reference.device}, {labels.device})"
        )
    if kappa < 1:
        raise KernelInputError(f"learnability: kappa must be >= 1, got {kappa}")
    if N % kappa:
        raise KernelInputError(f"learnability: N={N} is not divisible by kappa={kappa}")
    # Data-dependent: skipped while tracing (compile, export, make_fx). On an accelerator a
    # device-side assert, because reading the answer on the host would sync every guided step.
    if torch.compiler.is_compiling() or is_fake(labels) or not N:
        return
    if labels.device.type != "cpu":
        torch._assert_async(((labels >= 0) & (labels < C)).all(), "learnability: a label is out of range")
        return
    if bool(((labels < 0) | (labels >= C)).any()):
        bad = labels[(labels < 0) | (labels >= C)][0].item()
        raise KernelInputError(f"learnability: label {bad} is out of range for C={C} classes")


def _apply(backend: str, student, reference, labels, omega, kappa, block_m, block_c):
    return LearnabilityResult(*_Learnability.apply(
        student, reference, labels, float(omega), int(kappa), backend, block_m, block_c
    ))


def learnability_triton(
    student_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
    omega: float, kappa: int, block_m: int | None = None, block_c: int | None = None,
) -> LearnabilityResult:
    """The Triton path on any device Triton accepts (CUDA; CPU tensors under TRITON_INTERPRET=1).
    block_m / block_c: rows per program and column chunk (None = GPU heuristic)."""
    if not HAS_TRITON:
        raise RuntimeError("learnability_triton needs triton, which is not importable")
    _check(student_logits, reference_logits, labels, kappa)
    auto_m, auto_c = launch_config(*student_logits.shape)
    return _apply(
        "triton", student_logits, reference_logits, labels, omega, kappa,
        next_pow2(block_m or auto_m), next_pow2(block_c or auto_c),
    )


def learnability(
    student_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
    omega: float, kappa: int,
) -> LearnabilityResult:
    """Per-sample CE of both models, S, dS/dlogits for both, and the winner of each group of
    kappa consecutive samples, in one fused pass. S backpropagates into both logits.
    The kernel policy (lgd.kernels.policy) picks Triton (CUDA) or the compiled CPU op; else
    the torch reference."""
    _check(student_logits, reference_logits, labels, kappa)
    backend = policy.backend("learnability", student_logits.device)
    if backend == "triton":
        block_m, block_c = launch_config(*student_logits.shape)
        return _apply("triton", student_logits, reference_logits, labels, omega, kappa, block_m, block_c)
    return _apply("cpp" if backend == "cpp" else "reference", student_logits, reference_logits, labels,
                  omega, kappa, 0, 0)
