"""Images/s of WHOLE guided sampling of one unit, fast (one batch) vs reference (one image at a
time), LGD and IGD, through the pipeline's own `CandidateGenerator.sample` (lgd/candidates.py).

    pytest benchmarks/bench_guided_sampling.py --benchmark-only -q

The demo runs the demo preset's whole 25-step schedule with the batches a demo run makes. At
DiT-B/2 the paper's 50-step schedule takes minutes per unit on this CPU, so the loop runs a
shorter respaced schedule with the guidance window at the same fraction of it (extra_info
records steps, window and guided steps, and the originals). One timed round, no warm-up: a
unit runs many steps, so first-call costs are spread as in a real run. Except compiled (demo
only): its first unit compiles every graph, which a real run pays once, so it is timed on its
own (extra_info first_call_s) and the timed round is the second unit. influence-free (IGD, demo)
likewise: compiled with a zero influence gradient, the bound on compiled IGD sampling.
"""
import pytest

from _measure import environment, time_first_call
from _scenarios import BATCHED, COMPILED, KINDS, PROVIDERS, sampling_run, sampling_schedule, skip_unless_runnable

# config -> respaced steps, fast batch, reference images per call. The demo's fast batches are
# the demo run's own: one round of 10 classes x 1 slot x kappa (3 for LGD, 1 for IGD).
PLAN = {
    "demo": {"steps": 25, "fast": {"lgd": 30, "igd": 10}, "reference": {"lgd": 6, "igd": 3}},
    "dit-b2": {"steps": 3, "fast": {"lgd": 2, "igd": 2}, "reference": {"lgd": 1, "igd": 1}},
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(PLAN))
def test_guided_sampling(benchmark, scenarios, config, kind, provider):
    skip_unless_runnable(provider, config, kind)
    scn = scenarios(config)
    plan = PLAN[config]
    batched = provider in BATCHED
    images = plan["fast" if batched else "reference"][kind]
    run = sampling_run(scn, kind, provider, images, plan["steps"])
    benchmark.group = f"guided sampling | {config} | {kind.upper()}"
    benchmark.extra_info.update(
        kernel="guided_sampling", path=kind, provider=provider, images=images,
        batch=images if batched else 1, **sampling_schedule(scn, kind, plan["steps"]),
        **scn.info(), **environment(),
    )
    if provider in COMPILED:
        time_first_call(benchmark, run)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
