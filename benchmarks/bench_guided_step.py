"""Images/s of ONE guided reverse step: fast (one batch) vs reference (one image at a time),
learnability (LGD) and influence (IGD) guidance, at the demo and DiT-B/2 configurations.

    pytest benchmarks/bench_guided_step.py --benchmark-only -q

A step is the Sampler's: CFG forward of the DiT, DDPM step, decode of the Tweedie estimate,
classifiers, the backward to x_t (IGD: through the surrogate's parameter gradients), deviation
guidance. extra_info records the FLOPs of one call (FlopCounterMode), so a time converts to
achieved FLOP/s against the fp32 matmul ceiling of bench_matmul.py. Reference rows time a few
images and are normalised per image.

demo: the FLOP-counting call is the warm-up, then timed rounds. dit-b2: a call takes seconds,
so the single timed call is the counted one (the counter's per-op Python hook costs
microseconds against 0.1-1 s ops) and there is no warm-up.
"""
import pytest

from _measure import count_flops, environment
from _scenarios import KINDS, PROVIDERS, step_run

# config -> fast batch, reference images per call, timed rounds, separate warm-up call
PLAN = {
    "demo": {"fast": 30, "reference": {"lgd": 4, "igd": 2}, "rounds": {"lgd": 3, "igd": 2}, "warm_up": True},
    "dit-b2": {"fast": 2, "reference": {"lgd": 1, "igd": 1}, "rounds": {"lgd": 1, "igd": 1}, "warm_up": False},
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(PLAN))
def test_guided_step(benchmark, scenarios, config, kind, provider):
    scn = scenarios(config)
    plan = PLAN[config]
    images = plan["fast"] if provider == "fast" else plan["reference"][kind]
    run = step_run(scn, kind, provider, images)
    benchmark.group = f"guided step | {config} | {kind.upper()}"
    benchmark.extra_info.update(
        kernel="guided_step", path=kind, provider=provider, images=images,
        batch=images if provider == "fast" else 1, step_index=scn.step_index, warm_up=plan["warm_up"],
        **scn.info(), **environment(),
    )
    if plan["warm_up"]:
        flops = count_flops(run)
        benchmark.pedantic(run, rounds=plan["rounds"][kind], iterations=1, warmup_rounds=0)
    else:
        flops = {}
        benchmark.pedantic(lambda: flops.update(count_flops(run)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["flops"] = flops
