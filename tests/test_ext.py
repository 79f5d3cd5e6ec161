"""The compiled CPU op torch.ops.lgd.learnability (csrc/) against the plain torch twin, and
the package's behaviour without the extension."""
import os
import subprocess
import sys
import time

import pytest
import torch

from lgd import _ops
from lgd.kernels import learnability as lrn
from lgd.kernels._common import KernelInputError

needs_ext = pytest.mark.skipif(
    not _ops.has_op("learnability"),
    reason="lgd._C is not built (build: pip install -e . --no-build-isolation)",
)
OMEGA = 0.5
# Rounding the gradients to the output dtype is the only low-precision error: one ulp.
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _inputs(N, C, dtype):
    return (torch.randn(N, C).mul(3).to(dtype), torch.randn(N, C).mul(3).to(dtype),
            torch.randint(0, C, (N,)))


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("N,C,kappa", [(1, 1, 1), (6, 8, 3), (12, 17, 4), (30, 10, 1), (64, 1000, 8)])
def test_cpp_op_matches_reference(N, C, kappa, dtype):
    student, reference, labels = _inputs(N, C, dtype)
    fast = torch.ops.lgd.learnability(student, reference, labels, OMEGA, kappa)
    ref = lrn.learnability_reference(student, reference, labels, OMEGA, kappa)
    for name, f, r in zip(lrn.LearnabilityResult._fields, fast, ref):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        if name == "winners":
            assert torch.equal(f, r)
        elif name.startswith("grad"):
            torch.testing.assert_close(f.float(), r.float(), rtol=0, atol=GRAD_TOL[dtype], msg=name)
        else:
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=name)


@needs_ext
def test_cpp_op_accepts_non_contiguous_logits():
    student, reference, labels = _inputs(8, 12, torch.float32)
    fast = torch.ops.lgd.learnability(student.t().contiguous().t(), reference[:, :], labels, OMEGA, 2)
    ref = lrn.learnability_reference(student, reference, labels, OMEGA, 2)
    torch.testing.assert_close(fast[3], ref.grad_student)


@needs_ext
def test_cpp_winners_first_max_on_ties():
    from test_kernels import tied_inputs

    student, reference, labels, expected = tied_inputs()
    assert torch.equal(torch.ops.lgd.learnability(student, reference, labels, OMEGA, 4)[5], expected)


@needs_ext
def test_public_learnability_on_cpu_uses_cpp_and_backpropagates():
    student, reference, labels = _inputs(12, 10, torch.float32)
    s, r = student.clone().requires_grad_(True), reference.clone().requires_grad_(True)
    out = lrn.learnability(s, r, labels, OMEGA, 3)
    w = torch.randn(12)
    d_s, d_r = torch.autograd.grad(out.score, (s, r), w)
    s2, r2 = student.clone().requires_grad_(True), reference.clone().requires_grad_(True)
    ref = lrn.learnability_reference(s2, r2, labels, OMEGA, 3)
    e_s, e_r = torch.autograd.grad(ref.score, (s2, r2), w)
    torch.testing.assert_close(d_s, e_s)
    torch.testing.assert_close(d_r, e_r)
    assert not out.grad_student.requires_grad and not out.winners.requires_grad


BAD_INPUTS = [  # (override, error raised by the raw op, message)
    (dict(reference=torch.randn(6, 4)), ValueError, "differ in shape"),
    (dict(kappa=4), ValueError, "not divisible by kappa"),
    (dict(kappa=0), ValueError, "kappa"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 5])), IndexError, "out of range"),
    (dict(labels=torch.tensor([0, 0, 0, 0, 0, -1])), IndexError, "out of range"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must be"),
    (dict(student=torch.randn(6, 5, dtype=torch.float64)), ValueError,
     "must be float32, bfloat16 or float16"),
]


def _bad_args(override):
    args = dict(student=torch.randn(6, 5), reference=torch.randn(6, 5),
                labels=torch.zeros(6, dtype=torch.long), kappa=3)
    args.update(override)
    return args["student"], args["reference"], args["labels"], OMEGA, args["kappa"]


@needs_ext
@pytest.mark.parametrize("override,exc,match", BAD_INPUTS)
def test_cpp_op_rejects_bad_inputs(override, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.lgd.learnability(*_bad_args(override))


@pytest.mark.parametrize("override,_exc,match", BAD_INPUTS)
def test_public_learnability_rejects_bad_inputs(override, _exc, match):
    with pytest.raises(KernelInputError, match=match):
        lrn.learnability(*_bad_args(override))


@needs_ext
def test_cpp_op_inside_torch_compile():
    """The Meta kernel lets a compiled graph hold the op (forward and backward)."""
    torch._dynamo.reset()

    def step(s, r, labels):
        out = lrn.learnability(s, r, labels, OMEGA, 2)
        return out.score.sum() * 2, out.winners

    student, reference, labels = _inputs(8, 12, torch.float32)
    s, r = student.clone().requires_grad_(True), reference.clone().requires_grad_(True)
    start = time.perf_counter()
    total, winners = torch.compile(step, fullgraph=True, dynamic=False)(s, r, labels)
    total.backward()
    elapsed = time.perf_counter() - start
    ref = lrn.learnability_reference(student, reference, labels, OMEGA, 2)
    torch.testing.assert_close(total, ref.score.sum() * 2)
    assert torch.equal(winners, ref.winners)
    torch.testing.assert_close(s.grad, 2 * ref.grad_student)
    torch.testing.assert_close(r.grad, 2 * ref.grad_reference)
    assert elapsed < 120, f"compile took {elapsed:.0f} s"


def test_package_works_without_extension_and_warns_once():
    """Hide lgd._C in a fresh interpreter: lgd imports, the reference runs, one warning."""
    code = (
        "import sys, warnings; sys.modules['lgd._C'] = None\n"
        "import torch\n"
        "from lgd.kernels.learnability import learnability, learnability_reference\n"
        "s, r, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    outs = [learnability(s, r, y, 0.5, 3) for _ in range(3)]\n"
        "ref = learnability_reference(s, r, y, 0.5, 3)\n"
        "assert all(torch.equal(o.score, ref.score) for o in outs)\n"
        "msgs = [str(w.message) for w in seen if 'lgd._C' in str(w.message)]\n"
        "print(len(msgs)); print(msgs[0] if msgs else '')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.splitlines()[:2]
    assert count == "1", proc.stdout
    assert "not available" in message and "--no-build-isolation" in message
