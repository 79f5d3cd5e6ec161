"""The IGD bound arithmetic of benchmarks/make_table.py, on a hand-made benchmark list."""
import pytest

from tests.helpers import benchmark_module

make_table = benchmark_module("make_table")


def case(kernel: str, provider: str, seconds: float, images: int, **info) -> dict:
    extra = {"kernel": kernel, "provider": provider, "images": images, "batch": images, "threads": 2,
             "config": "demo", "path": "igd", **info}
    return {"group": f"{kernel} | demo | IGD", "name": kernel, "extra_info": extra,
            "stats": {"median": seconds, "min": seconds}}


def suite(free_step: float) -> list[dict]:
    """Ceiling 100 GFLOP/s; influence gradient 0.1 GFLOP per image; reference step 1 s per image."""
    flops = {"total": 9e9, "dit": 1e9, "codec": 1e9, "classifiers": 1e9, "other": 2e9}
    return [
        case("mm", "torch", 1.0, 1, flops={"total": 1e11}),
        case("guided_step", "fast", 3.0, 30, flops=flops),
        case("guided_step", "compiled", 0.15 * 10, 10),
        case("guided_step", "influence-free", free_step * 10, 10),
        case("guided_step", "reference", 1.0, 1),
        case("guided_sampling", "compiled", 0.5 * 10, 10, guided_steps=4),
        case("guided_sampling", "influence-free", 0.1 * 10, 10, guided_steps=4),
        case("guided_sampling", "reference", 2.0, 1, guided_steps=4),
    ]


def bound(benchmarks: list[dict]) -> str:
    return " ".join(make_table.igd_bound(benchmarks, make_table.ceilings(benchmarks)))


def test_influence_rate_needed_for_the_goal():
    benchmarks = suite(free_step=0.05)
    text = bound(benchmarks)
    assert make_table.influence_flops(benchmarks) == pytest.approx(1e8)
    assert "20.00x (one step, batch 10) and 20.00x (whole sampling, batch 10)" in text
    # step: 10x allows 0.1 s/image, the rest takes 0.05, so 0.1 GFLOP in 0.05 s; compiled spends 0.1 s
    assert "one step: 2 GFLOP/s (2 % of the matmul ceiling), against 1 GFLOP/s (1 %) compiled" in text
    # sampling: 4 guided steps = 0.4 GFLOP in 0.2 - 0.1 s; compiled spends 0.4 s
    assert "whole sampling: 4 GFLOP/s (4 % of the matmul ceiling), against 1 GFLOP/s (1 %) compiled" in text


def test_goal_out_of_reach_when_the_rest_is_too_slow():
    assert "one step: more than any rate: the rest alone is too slow" in bound(suite(free_step=0.2))


def test_no_bound_without_the_influence_free_rows():
    benchmarks = [b for b in suite(0.05) if b["extra_info"]["provider"] != "influence-free"]
    assert bound(benchmarks) == ""
