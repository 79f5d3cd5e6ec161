"""Triton kernels against their plain torch twins, run on CPU under TRITON_INTERPRET=1.

Interpreter runs prove correctness only, never speed. Shapes are tiny and block_m is large so
each test launches few programs (the interpreter's cost grows with the program count).
Low-precision results pass the flash-attention rule:
    max|fast - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + atol
with ref_fp32 the twin on the same (rounded) inputs in fp32 and ref_lowp the twin run natively
in bf16/fp16.
"""
import os
import subprocess
import sys

import pytest
import torch

from lgd.kernels import adaln_norm, group_norm_silu as gns, learnability as lrn, policy
from lgd.kernels._common import HAS_TRITON, LOW_PRECISION, KernelInputError, flash_rule

from tests.helpers import tiny_vae

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

DTYPES = (torch.float32,) + LOW_PRECISION


def assert_matches(fast, ref_fp32, ref_lowp, dtype, atol=1e-5, name=""):
    """fp32: tight. bf16/fp16: within twice PyTorch's own error in that precision."""
    err, bound = flash_rule(fast, ref_fp32, ref_lowp, dtype, atol)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


# ---------------------------------------------------------------- adaLN-modulated LayerNorm

ADALN_CASES = [  # (B, T, D, block_m): non-power-of-2 D; block_m < T exercises partial sums
    (2, 5, 48, 64),
    (3, 7, 100, 4),
    (1, 16, 64, 16),
]


def _adaln_inputs(B, T, D, dtype):
    x = torch.randn(B, T, D) * 2 + 0.5
    shift, scale = torch.randn(B, D), torch.randn(B, D) * 0.5
    dy = torch.randn(B, T, D)
    return [t.to(dtype) for t in (x, shift, scale, dy)]


def _adaln_run(fn, x, shift, scale, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, shift, scale)]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy.to(y.dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,D,block_m", ADALN_CASES)
def test_adaln_triton_matches_reference(B, T, D, block_m, dtype):
    x, shift, scale, dy = _adaln_inputs(B, T, D, dtype)
    fast = _adaln_run(lambda *a: adaln_norm.adaln_modulate_triton(*a, block_m=block_m), x, shift, scale, dy)
    ref = _adaln_run(adaln_norm.adaln_modulate_reference, *(t.float() for t in (x, shift, scale, dy)))
    low = _adaln_run(lambda *a: adaln_norm.adaln_modulate_reference(*a, upcast=False), x, shift, scale, dy)
    for name, f, r, lo in zip(("y", "dx", "dshift", "dscale"), fast, ref, low):
        assert f.dtype == dtype and f.shape == r.shape
        assert_matches(f, r, lo, dtype, name=name)


def test_adaln_public_dispatch_uses_reference_on_cpu():
    x, shift, scale, _ = _adaln_inputs(2, 3, 8, torch.float32)
    torch.testing.assert_close(
        adaln_norm.adaln_modulate(x, shift, scale), adaln_norm.adaln_modulate_reference(x, shift, scale)
    )


def test_adaln_rejects_bad_shapes():
    x = torch.randn(2, 3, 8)
    with pytest.raises(KernelInputError, match=r"scale must be \[B, D\]"):
        adaln_norm.adaln_modulate(x, torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(KernelInputError, match=r"x must be \[B, T, D\]"):
        adaln_norm.adaln_modulate(x[0], torch.randn(2, 8), torch.randn(2, 8))


# ---------------------------------------------------------------- learnability

LRN_CASES = [  # (N, C, kappa, block_m, block_c): single chunk, ragged chunks, ImageNet-sized C
    (12, 37, 3, 16, 64),
    (24, 100, 4, 8, 32),
    (10, 1000, 5, 16, 256),
]
OMEGA = 0.5


def _lrn_inputs(N, C, dtype):
    student, reference = torch.randn(N, C) * 3, torch.randn(N, C) * 3
    labels = torch.randint(0, C, (N,))
    return student.to(dtype), reference.to(dtype), labels


def _lrn_run(fn, student, reference, labels, kappa, grad_w):
    s = student.detach().clone().requires_grad_(True)
    r = reference.detach().clone().requires_grad_(True)
    out = fn(s, r, labels, OMEGA, kappa)
    d_s, d_r = torch.autograd.grad(out.score, (s, r), grad_w)
    return out, d_s, d_r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C,kappa,block_m,block_c", LRN_CASES)
def test_learnability_triton_matches_reference(N, C, kappa, block_m, block_c, dtype):
    student, reference, labels = _lrn_inputs(N, C, dtype)
    w = torch.randn(N)

    def triton_fn(*a):
        return lrn.learnability_triton(*a, block_m=block_m, block_c=block_c)

    fast, fd_s, fd_r = _lrn_run(triton_fn, student, reference, labels, kappa, w)
    ref, rd_s, rd_r = _lrn_run(
        lrn.learnability_reference, student.float(), reference.float(), labels, kappa, w
    )
    low, ld_s, ld_r = _lrn_run(
        lambda *a: lrn.learnability_reference(*a, upcast=False), student, reference, labels, kappa, w
    )
    for name in ("ce_student", "ce_reference", "score", "grad_student", "grad_reference"):
        f, r, lo = getattr(fast, name), getattr(ref, name), getattr(low, name)
        assert f.dtype == (dtype if name.startswith("grad") else torch.float32), name
        assert_matches(f, r, lo, dtype, name=name)
    for name, f, r, lo in (("dS/dstudent", fd_s, rd_s, ld_s), ("dS/dreference", fd_r, rd_r, ld_r)):
        assert f.dtype == dtype
        assert_matches(f, r, lo, dtype, name=name)
    # Winners are the first argmax of the op's own S per group.
    expected = fast.score.view(-1, kappa).argmax(1) + torch.arange(0, N, kappa)
    torch.testing.assert_close(fast.winners, expected, rtol=0, atol=0)


def tied_inputs():
    """Two groups of 4: in group 0 rows 1..3 tie at the max; in group 1 all four rows tie."""
    student, reference = torch.randn(8, 6), torch.randn(8, 6)
    labels = torch.randint(0, 6, (8,))
    student[1, labels[1]] = -20.0  # the student is badly wrong on row 1: S is the group's max
    for i in (2, 3):
        student[i], reference[i], labels[i] = student[1], reference[1], labels[1]
    student[4:], reference[4:], labels[4:] = student[4], reference[4], labels[4]
    return student, reference, labels, torch.tensor([1, 4])


def test_learnability_triton_winners_first_max_on_ties():
    student, reference, labels, expected = tied_inputs()
    out = lrn.learnability_triton(student, reference, labels, OMEGA, 4, block_m=8, block_c=8)
    assert torch.equal(out.winners, expected)
    assert torch.equal(lrn.learnability_reference(student, reference, labels, OMEGA, 4).winners, expected)


def test_learnability_triton_kappa_one_is_identity():
    student, reference, labels = _lrn_inputs(6, 5, torch.float32)
    out = lrn.learnability_triton(student, reference, labels, OMEGA, 1, block_m=8, block_c=8)
    assert torch.equal(out.winners, torch.arange(6))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(reference=torch.randn(6, 4)), "differ in shape"),
        (dict(kappa=4), "not divisible by kappa"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 4, 5])), "out of range"),
        (dict(labels=torch.zeros(6, dtype=torch.int32)), "labels must be int64"),
    ],
)
def test_learnability_triton_rejects_bad_inputs(kwargs, match):
    args = dict(student=torch.randn(6, 5), reference=torch.randn(6, 5),
                labels=torch.zeros(6, dtype=torch.long), kappa=3)
    args.update(kwargs)
    with pytest.raises(KernelInputError, match=match):
        lrn.learnability_triton(args["student"], args["reference"], args["labels"], OMEGA, args["kappa"])


# ---------------------------------------------------------------- GroupNorm + SiLU

GNS_CASES = [  # (shape, groups, block): the loops over a group and over a channel run several times
    ((2, 8, 5, 5), 4, 16),
    ((1, 6, 3, 7), 3, 8),
    ((3, 12, 4, 4), 12, 16),  # one channel per group (the classifiers' instance norm)
    ((2, 4, 10), 2, 32),  # [B, C, L]
]


def _gns_inputs(shape, dtype, affine=True):
    C = shape[1]
    x = torch.randn(shape) * 2 + 0.7
    weight = torch.randn(C) * 0.5 + 1 if affine else None
    bias = torch.randn(C) * 0.5 if affine else None
    dy = torch.randn(shape)
    return x.to(dtype), None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype), dy


def _gns_run(fn, x, weight, bias, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy.to(y.dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,block", GNS_CASES)
def test_group_norm_silu_triton_matches_reference(shape, groups, block, dtype):
    x, w, b, dy = _gns_inputs(shape, dtype)
    fast = _gns_run(lambda x, w, b: gns.group_norm_silu_triton(x, groups, w, b, block=block), x, w, b, dy)
    ref = _gns_run(lambda x, w, b: gns.group_norm_silu_reference(x, groups, w, b), x.float(), w.float(), b.float(), dy)
    low = _gns_run(lambda x, w, b: gns.group_norm_silu_reference(x, groups, w, b, upcast=False), x, w, b, dy)
    for name, f, r, lo in zip(("y", "dx", "dweight", "dbias"), fast, ref, low):
        assert f.dtype == dtype and f.shape == r.shape
        assert_matches(f, r, lo, dtype, atol=1e-4, name=name)


def test_group_norm_silu_triton_without_affine():
    x, _, _, dy = _gns_inputs((2, 6, 3, 3), torch.float32, affine=False)
    fast = _gns_run(lambda x: gns.group_norm_silu_triton(x, 3, block=8), x, None, None, dy)
    ref = _gns_run(lambda x: gns.group_norm_silu_reference(x, 3, None, None), x, None, None, dy)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_group_norm_silu_triton_refuses_double_backward():
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    y = gns.group_norm_silu_triton(x, 2, block=8)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_group_norm_silu_rejects_bad_inputs():
    with pytest.raises(KernelInputError, match="do not split into 3 groups"):
        gns.group_norm_silu(torch.randn(1, 4, 2, 2), 3)
    with pytest.raises(KernelInputError, match=r"weight must be \[C\]"):
        gns.group_norm_silu(torch.randn(1, 4, 2, 2), 2, torch.ones(3), torch.zeros(4))


def _tiny_decoder():
    return tiny_vae(blocks=(8, 16), groups=4).decoder.eval().requires_grad_(False)


def test_fused_decoder_matches_plain_decoder(monkeypatch):
    """The decoder with its GroupNorm+SiLU pairs fused gives the plain decoder's output and
    input gradient, through the reference dispatch (CPU) and the Triton kernels (interpreter)."""
    from lgd.models.vae import fuse_group_norm_silu

    plain, fused = _tiny_decoder(), _tiny_decoder()
    keys = list(fused.state_dict())
    assert fuse_group_norm_silu(fused) == 2 * (2 + 2 * 2) + 1  # 2 mid + 2 x 2 up ResNet blocks; the head
    assert list(fused.state_dict()) == keys
    z = torch.randn(2, 4, 4, 4)
    dy = torch.randn(2, 3, 8, 8)

    def run(decoder):
        leaf = z.clone().requires_grad_(True)
        out = decoder(leaf)
        return out, torch.autograd.grad(out, leaf, dy)[0]

    want = run(plain)
    for route in ("torch", "triton"):
        monkeypatch.setattr(policy, "backend", lambda kernel, device, r=route: r)
        got = run(fused)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=route)


TRACE_SCRIPT = """
import logging, torch
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx
from lgd.kernels.adaln_norm import adaln_modulate_triton
from lgd.kernels.learnability import learnability_triton
from lgd.kernels.group_norm_silu import group_norm_silu_triton
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

def adaln(x, shift, scale):
    y = adaln_modulate_triton(x, shift, scale, block_m=8)
    return torch.autograd.grad(y.sum(), (x, shift, scale))

def score(s, r, y):
    out = learnability_triton(s, r, y, 0.5, 2, block_m=8, block_c=8)
    return out.score, out.winners

leaf = lambda *shape: torch.randn(*shape, requires_grad=True)
print(make_fx(adaln, tracing_mode="fake")(leaf(2, 5, 24), leaf(2, 24), leaf(2, 24)).code)
logits = torch.randn(8, 10)
def gns(x, w, b):
    y = group_norm_silu_triton(x, 2, w, b, block=8)
    return torch.autograd.grad(y.sum(), (x, w, b))
print(make_fx(gns, tracing_mode="fake")(leaf(2, 4, 3, 3), leaf(4), leaf(4)).code)
print(make_fx(score, tracing_mode="fake")(logits, logits, torch.randint(0, 10, (8,))).code)

class Captured(Exception):
    pass

def grab(gm, _):  # stop before running: there is no GPU to launch the kernel on
    print(gm.code)
    raise Captured

try:
    torch.compile(lambda x, sh, sc: adaln_modulate_triton(x, sh, sc, block_m=8), fullgraph=True,
                  backend=aot_autograd(fw_compiler=grab))(leaf(2, 5, 24), leaf(2, 24), leaf(2, 24))
except Exception as err:
    assert "Captured" in repr(err), err
"""


def test_triton_ops_trace_for_torch_compile():
    """The ops trace with fake tensors, and AOTAutograd decomposes them into the Triton kernel
    HOP that Inductor compiles. Needs real @triton.jit (not the interpreter): subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("lgd.adaln_modulate_fwd", "lgd.adaln_modulate_bwd", "lgd.learnability_triton",
               "lgd.group_norm_silu_fwd", "lgd.group_norm_silu_bwd",
               "triton_kernel_wrapper_functional"):
        assert op in proc.stdout, f"{op} missing from the traced graphs:\n{proc.stdout}"
