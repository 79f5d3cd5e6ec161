"""This machine's fp32 matmul rate: the ceiling the guided step's FLOP/s is set against.

    pytest benchmarks/bench_matmul.py --benchmark-only -q

torch.mm of two n x n fp32 matrices into a preallocated output, 2 n^3 FLOPs per call; the
ceiling is the best call over rounds and sizes (the least-disturbed one on a shared machine).
"""
import pytest
import torch

from _measure import cpu_mhz, environment

ROUNDS = 5


@pytest.mark.parametrize("n", [2048, 4096])
def test_matmul_fp32(benchmark, n):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    benchmark.group = "fp32 matmul ceiling"
    benchmark.extra_info.update(
        kernel="mm", provider="torch", n=n, flops={"total": 2 * n**3}, cpu_mhz=cpu_mhz(), **environment(),
    )
    benchmark.pedantic(torch.mm, args=(a, b), kwargs={"out": out}, rounds=ROUNDS, iterations=1, warmup_rounds=1)
