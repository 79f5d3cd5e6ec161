"""Peak memory and the op profile of one guided step, fast (one batch) vs reference (one image).

    pytest benchmarks/bench_guided_memory.py --benchmark-only -q

One profiled call per case (see _measure.py for the two memory views: RSS high-water mark
above the pre-run resident set, and the peak of torch's live CPU allocations). At the demo
configuration a one-image call first loads lazily initialised code (oneDNN kernels), which
would otherwise count as step memory; at DiT-B/2 the peaks dwarf it. DiT-B/2 runs LGD only:
its IGD step keeps the same graph through the DiT (the reference path retains it for E
backward passes), and its one-image reference step alone takes ~20-40 s here. The time
recorded is that of a profiled run: use bench_guided_step.py for speed.
"""
import pytest

from _measure import environment, memory_and_profile
from _scenarios import KINDS, step_run

FAST_BATCH = {"demo": 30, "dit-b2": 2}
WARM_UP = {"demo": True, "dit-b2": False}
CASES = [(config, kind) for config in FAST_BATCH for kind in KINDS if (config, kind) != ("dit-b2", "igd")]


@pytest.mark.parametrize("provider", ("fast", "reference"))
@pytest.mark.parametrize("config,kind", CASES)
def test_guided_step_memory(benchmark, scenarios, config, kind, provider):
    scn = scenarios(config)
    images = FAST_BATCH[config] if provider == "fast" else 1
    if WARM_UP[config]:
        step_run(scn, kind, provider, 1)()
    run = step_run(scn, kind, provider, images)
    benchmark.group = f"guided step memory | {config}"
    benchmark.extra_info.update(
        kernel="guided_step_memory", path=kind, provider=provider, images=images, batch=images,
        step_index=scn.step_index, **scn.info(), **environment(),
    )
    result = {}
    benchmark.pedantic(lambda: result.update(memory_and_profile(run)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
