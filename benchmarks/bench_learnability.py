"""Fused learnability op on CPU: the compiled C++ op vs the plain torch composition.

    pytest benchmarks/bench_learnability.py --benchmark-only -q

N x C = 3000 x 1000 fp32 (a rank-selection batch scored by ImageNet-sized classifiers).
The op must at least read both logit matrices and write both gradients: 4 * N * C * 4 bytes
(48 MB); extra_info records that floor so a time converts to achieved GB/s against the
machine's memory bandwidth.
"""
import platform

import pytest
import torch

from lgd import _ops
from lgd.kernels.learnability import learnability_reference

N, C, KAPPA, OMEGA = 3000, 1000, 10, 0.5


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(N, C, generator=gen) * 3
    reference = torch.randn(N, C, generator=gen) * 3
    labels = torch.randint(0, C, (N,), generator=gen)
    return student, reference, labels


def _cpp(student, reference, labels, omega, kappa):
    return torch.ops.lgd.learnability(student, reference, labels, omega, kappa)


PROVIDERS = {
    "cpp": pytest.param(_cpp, marks=pytest.mark.skipif(
        not _ops.has_op("learnability"), reason="lgd._C is not built")),
    "torch": pytest.param(learnability_reference),
}


@pytest.mark.parametrize("fn", list(PROVIDERS.values()), ids=list(PROVIDERS))
def test_learnability_cpu(benchmark, fn, inputs, request):
    benchmark.group = f"learnability N={N} C={C} fp32"
    benchmark.extra_info.update(
        kernel="learnability",
        provider=request.node.callspec.id,
        N=N, C=C, kappa=KAPPA, dtype="float32", device="cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        min_bytes=4 * N * C * 4,
    )
    out = benchmark(fn, *inputs, OMEGA, KAPPA)
    assert out[5].shape == (N // KAPPA,)
