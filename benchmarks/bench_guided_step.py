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
microseconds against 0.1-1 s ops) and there is no warm-up. compiled (demo only): the first
call compiles and is timed on its own (extra_info first_call_s); its FLOPs are counted on the
eager fast call, which computes the same ops. influence-free (IGD, demo): compiled with a zero
influence gradient, the bound on the compiled IGD step; no FLOP count.
"""
import pytest

from _measure import count_flops, environment, time_first_call
from _scenarios import BATCHED, COMPILED, KINDS, PROVIDERS, skip_unless_runnable, step_run

# config -> fast batch, reference images per call, timed rounds, separate warm-up call
PLAN = {
    "demo": {"fast": 30, "reference": {"lgd": 4, "igd": 2}, "rounds": {"lgd": 3, "igd": 2}, "warm_up": True},
    "dit-b2": {"fast": 2, "reference": {"lgd": 1, "igd": 1}, "rounds": {"lgd": 1, "igd": 1}, "warm_up": False},
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(PLAN))
def test_guided_step(benchmark, scenarios, config, kind, provider):
    skip_unless_runnable(provider, config, kind)
    scn = scenarios(config)
    plan = PLAN[config]
    batched = provider in BATCHED
    images = plan["fast"] if batched else plan["reference"][kind]
    run = step_run(scn, kind, provider, images)
    benchmark.group = f"guided step | {config} | {kind.upper()}"
    benchmark.extra_info.update(
        kernel="guided_step", path=kind, provider=provider, images=images,
        batch=images if batched else 1, step_index=scn.step_index, warm_up=plan["warm_up"],
        **scn.info(), **environment(),
    )
    if plan["warm_up"]:
        if provider in COMPILED:  # the warm-up compiles; the eager fast call counts the compiled ops
            time_first_call(benchmark, run)
            flops = count_flops(step_run(scn, kind, "fast", images)) if provider == "compiled" else {}
        else:
            flops = count_flops(run)
        benchmark.pedantic(run, rounds=plan["rounds"][kind], iterations=1, warmup_rounds=0)
    else:
        flops = {}
        benchmark.pedantic(lambda: flops.update(count_flops(run)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["flops"] = flops
