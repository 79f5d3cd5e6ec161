"""The fused instance norm -> ReLU -> mean pool (the C++ op of csrc/norm_relu_pool.cpp, through
lgd.kernels.norm_relu_pool) against its plain torch twin, forward and backward, and inside the
compiled training step's torch.func.grad_and_value.

Tolerance (the flash-attention rule): |fast - ref64| <= 2 |ref - ref64| + atol * max|ref64|,
ref the twin run in the op's dtype, ref64 in float64.
"""
import copy

import pytest
import torch
from torch.func import functional_call, grad_and_value

from lgd import _ops
from lgd.kernels import policy
from lgd.kernels._common import KernelInputError
from lgd.kernels.norm_relu_pool import (NormReLUPool, norm_relu_pool, norm_relu_pool_cpp,
                                        norm_relu_pool_reference)

pytestmark = [
    pytest.mark.skipif(not _ops.has_op("norm_relu_pool"),
                       reason="lgd._C is not built (build: pip install -e . --no-build-isolation)"),
    pytest.mark.usefixtures("one_thread"),
]
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _inputs(shape, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    return x, torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)


def _run(fn, x, w, b, pool, dy, dtype, layout):
    x = x.to(dtype).contiguous(memory_format=layout).requires_grad_(True)
    w, b = w.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
    y = fn(x, w, b, pool)
    grads = torch.autograd.grad(y, (x, w, b), dy.to(dtype))
    return [t.detach().double() for t in (y, *grads)]


def _assert_flash(fast, ref, ref64, dtype, names=("out", "grad_x", "grad_weight", "grad_bias")):
    for name, f, r, r64 in zip(names, fast, ref, ref64):
        assert f.shape == r64.shape, name
        bound = 2 * (r - r64).abs().max().item() + ATOL[dtype] * r64.abs().max().item()
        err = (f - r64).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


SHAPES = [  # (N, C, H, W), pool: odd sizes crop, C off the vector width, no pool, pool 3 and 4
    ((2, 5, 7, 9), 2), ((3, 32, 32, 32), 2), ((2, 8, 6, 6), 3), ((2, 12, 5, 5), 1), ((1, 3, 8, 8), 4),
    ((4, 17, 9, 8), 2), ((1, 1, 2, 2), 2)]


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,pool", SHAPES)
def test_cpp_op_matches_reference(shape, pool, dtype, layout):
    x, w, b = _inputs(shape, dtype, seed=sum(shape))
    dy = torch.randn_like(norm_relu_pool_reference(x, w, b, pool))
    fast = _run(norm_relu_pool_cpp, x, w, b, pool, dy, dtype, layout)
    ref = _run(norm_relu_pool_reference, x, w, b, pool, dy, dtype, layout)
    ref64 = _run(norm_relu_pool_reference, x, w, b, pool, dy, torch.float64, layout)
    _assert_flash(fast, ref, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_statistics_hold_where_the_mean_dwarfs_the_spread(dtype):
    """Activations at 1000 +- 2: a one-pass E[x^2] - E[x]^2 would lose the variance in fp32. The
    truth is the float64 twin on the centred input (the norm does not see a shift), which
    float64 represents 1000 x more finely than the raw one."""
    centred, w, b = _inputs((2, 16, 16, 16), dtype)
    x = centred + 1000.0
    dy = torch.randn_like(norm_relu_pool_reference(x, w, b, 2))
    fast = _run(norm_relu_pool_cpp, x, w, b, 2, dy, dtype, torch.channels_last)
    ref = _run(norm_relu_pool_reference, x, w, b, 2, dy, dtype, torch.channels_last)
    truth = _run(norm_relu_pool_reference, centred, w, b, 2, dy, torch.float64, torch.channels_last)
    _assert_flash(fast, ref, truth, dtype)


def test_output_is_channels_last_and_does_not_depend_on_the_thread_count():
    x, w, b = (t.float() for t in _inputs((8, 32, 16, 16), torch.float32))
    dy = torch.randn(8, 32, 8, 8)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_run(norm_relu_pool_cpp, x, w, b, 2, dy, torch.float32, torch.channels_last))
        out = norm_relu_pool_cpp(x, w, b, 2)
        assert out.is_contiguous(memory_format=torch.channels_last)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_dispatch_follows_the_kernel_policy():
    x, w, b = (t.float() for t in _inputs((2, 4, 8, 8), torch.float32))
    assert policy.backend("norm_relu_pool", "cpu") == "cpp"
    with policy.kernel_mode("fused"):  # no Triton kernel: CUDA runs the plain ops
        assert policy.backend("norm_relu_pool", "cuda") == "torch"
    with policy.kernel_mode("torch"):
        assert torch.equal(norm_relu_pool(x, w, b, 2), norm_relu_pool_reference(x, w, b, 2))
    with policy.kernel_mode("auto"):
        torch.testing.assert_close(norm_relu_pool(x, w, b, 2), norm_relu_pool_reference(x, w, b, 2))
        # dtypes the op does not take run the twin, bit for bit
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        assert torch.equal(norm_relu_pool(xb, wb, bb, 2), norm_relu_pool_reference(xb, wb, bb, 2))


@pytest.mark.parametrize("call,match", [
    (lambda x, w, b: norm_relu_pool(x[0], w, b, 2), r"x must be \[N, C, H, W\]"),
    (lambda x, w, b: norm_relu_pool(x, w[:3], b, 2), r"weight and bias must be \[4\]"),
    (lambda x, w, b: norm_relu_pool(x, w, b, 0), "pool must be >= 1"),
    (lambda x, w, b: norm_relu_pool_cpp(x.bfloat16(), w.bfloat16(), b.bfloat16(), 2), "CPU tensors of one dtype"),
])
def test_bad_inputs_are_refused_clearly(call, match):
    x, w, b = (t.float() for t in _inputs((2, 4, 8, 8), torch.float32))
    with pytest.raises(KernelInputError, match=match):
        call(x, w, b)


def test_raw_op_checks_its_arguments():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="weight and bias must be"):
        torch.ops.lgd.norm_relu_pool(x, torch.ones(3), torch.zeros(4), 2, 1e-5)


def test_double_backward_raises():
    x, w, b = (t.float().requires_grad_(True) for t in _inputs((2, 4, 8, 8), torch.float32))
    (gx,) = torch.autograd.grad(norm_relu_pool_cpp(x, w, b, 2).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_grad_and_value_through_a_convnet_block(backend):
    """The training step's form: torch.func.grad_and_value of functional_call over a conv and
    NormReLUPool, compiled fullgraph, against the plain block's eager gradient. Dynamo traces
    the autograd.Function (rather than only its forward) because the op's input is computed from
    the differentiated parameters; this test fails if that ever stops being so."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(16, 16), torch.nn.ReLU(),
                                torch.nn.AvgPool2d(2))
    with torch.no_grad():
        plain[1].weight.normal_(), plain[1].bias.normal_()
    fused = copy.deepcopy(plain)
    fused[1] = NormReLUPool(16, 2)
    fused[1].load_state_dict(plain[1].state_dict())
    fused[2], fused[3] = torch.nn.Identity(), torch.nn.Identity()
    x = torch.rand(6, 3, 16, 16)
    params = {k: v.detach() for k, v in plain.named_parameters()}

    def loss(model):
        return lambda p: functional_call(model, p, (x,)).pow(2).mean()
    grads_ref, value_ref = grad_and_value(loss(plain))(params)
    torch._dynamo.reset()
    grads, value = torch.compile(grad_and_value(loss(fused)), backend=backend, fullgraph=True)(params)
    torch.testing.assert_close(value, value_ref, rtol=1e-5, atol=1e-6)
    for k in params:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6, msg=k)
