"""Fused instance norm -> ReLU -> mean pool on CPU, forward and backward: the C++ op against the
plain torch composition, eager and compiled by inductor (what the training step ran before).

    pytest benchmarks/bench_norm_relu_pool.py --benchmark-only -q

Shapes: the demo network's three blocks on one micro-batch (20 images, ConvNet-3 width 32 at
32 px: 32, 16 and 8 px before pooling), one thread (the evaluation's processes run one each).
A fused forward and backward must at least read x twice (statistics, then backward), read
grad_out and write out and grad_x: extra_info's min_bytes, against the machine's memory
bandwidth. Isolated, inductor's graph of these three ops is slower than it is inside the
whole training step, where bench_training.py's "compiled" against "compiled, plain norm"
gives the gain that counts.
"""
import pytest
import torch

from _measure import environment

from lgd import _ops
from lgd.kernels.norm_relu_pool import norm_relu_pool_cpp, norm_relu_pool_reference

N, C = 20, 32
SIZES = (32, 16, 8)


def _forward_backward(fn):
    def run(x, w, b, dy):
        return torch.autograd.grad(fn(x, w, b, 2), (x, w, b), dy)
    return run


_compiled_reference = torch.compile(norm_relu_pool_reference, dynamic=False)  # one graph per shape, as in the step
PROVIDERS = {
    "cpp": _forward_backward(norm_relu_pool_cpp),
    "torch compiled": _forward_backward(_compiled_reference),
    "torch eager": _forward_backward(norm_relu_pool_reference),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size", SIZES)
def test_norm_relu_pool_cpu(benchmark, provider, size):
    if provider == "cpp" and not _ops.has_op("norm_relu_pool"):
        pytest.skip("lgd._C is not built")
    fn = PROVIDERS[provider]
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(N, C, size, size, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(C, generator=gen).requires_grad_()
    b = torch.randn(C, generator=gen).requires_grad_()
    dy = torch.randn(N, C, size // 2, size // 2, generator=gen).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn(x, w, b, dy)  # compile outside the timing
        benchmark.group = f"norm_relu_pool N={N} C={C} {size}px fp32 fwd+bwd"
        benchmark.extra_info.update(kernel="norm_relu_pool", provider=provider,
                                    N=N, C=C, size=size,
                                    min_bytes=4 * (3 * x.numel() + 2 * dy.numel()), **environment())
        grads = benchmark(fn, x, w, b, dy)
    finally:
        torch.set_num_threads(threads)
    assert grads[0].shape == x.shape
