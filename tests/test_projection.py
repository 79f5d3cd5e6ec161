"""benchmarks/projection.py: the goals, the IGD bound and the H100 projections, as numbers."""
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def P():
    """benchmarks/projection.py, with benchmarks/ on sys.path for its import of records."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("projection")


def record(kernel: str, provider: str, seconds: float, images: int = 1, best: float | None = None, **info):
    extra = {"kernel": kernel, "provider": provider, "images": images, "batch": images, "threads": 2,
             "config": "demo", "path": "lgd", **info}
    b = {"group": f"{kernel} | {extra['config']} | {extra['path']}", "name": provider, "extra_info": extra,
         "stats": {"median": seconds, "min": seconds if best is None else best, "rounds": 1}}
    return importlib.import_module("records").from_benchmark(b)


def mm(seconds: float, n: int = 1000, threads: int = 2):
    return record("mm", "torch", seconds, flops={"total": 2 * n**3}, threads=threads, n=n)


def test_ceiling_is_the_best_call_per_thread_count(P):
    records = [mm(0.02), mm(0.01), mm(0.04, threads=1)]  # 2e9 FLOPs per call
    assert P.ceilings(records) == {2: pytest.approx(2e11), 1: pytest.approx(5e10)}


def test_step_goals_pass_and_fail(P):
    # reference 1 image/s; fast LGD 6 images/s (goal 5x: met), compiled 4.9 (not met)
    records = [record("guided_step", "reference", 1.0), record("guided_step", "fast", 10 / 6, 10),
               record("guided_step", "compiled", 10 / 4.9, 10)]
    goals = {g.what: g for g in P.goals(records, {})}
    fast = goals["fast LGD >= 5x reference images/s (demo, one step)"]
    compiled = goals["compiled LGD >= 5x reference images/s (demo, one step)"]
    assert (fast.measured, fast.met, fast.threads) == (pytest.approx(6.0), True, 2)
    assert (compiled.measured, compiled.met) == (pytest.approx(4.9), False)
    # no goal for a config other than the demo, nor without a reference
    other = [record("guided_step", name, 1.0, config="dit-b2") for name in ("reference", "fast")]
    assert P.goals(other, {}) == [] and P.goals(records[1:], {}) == []


def test_op_and_ceiling_goals(P):
    ops = [record("learnability", "cpp", 0.01, N=3000, C=1000), record("learnability", "torch", 0.02, N=3000, C=1000)]
    (op,) = P.goals(ops, {})
    assert op.what.endswith("(N=3000, C=1000)") and op.measured == pytest.approx(2.0) and not op.met
    # DiT-B/2 fast step: 6e10 FLOPs in its best call of 1 s against a 100 GFLOP/s ceiling: 60 %
    step = record("guided_step", "fast", 2.0, 4, best=1.0, config="dit-b2", flops={"total": 6e10})
    (share,) = P.goals([step], {2: 1e11})
    assert share.share and share.measured == pytest.approx(0.6) and share.met
    assert P.goals([step], {1: 1e11}) == []  # no ceiling at its thread count


def igd_suite(P, free_per_image: float):
    """Reference 1 s per image, compiled 0.15 s, influence gradient 0.1 GFLOP per image."""
    flops = {"total": 9e9, "dit": 1e9, "codec": 1e9, "classifiers": 1e9, "other": 2e9}
    return [record("guided_step", "fast", 3.0, 30, path="igd", flops=flops),
            record("guided_step", "compiled", 1.5, 10, path="igd"),
            record("guided_step", "influence-free", free_per_image * 10, 10, path="igd"),
            record("guided_step", "reference", 1.0, path="igd")]


def test_igd_bound_numbers(P):
    records = igd_suite(P, 0.05)
    assert P.influence_flops(records) == pytest.approx(1e8)
    (bound,) = P.igd_bound(records, {2: 1e11})
    # 20 images/s influence-free vs 1 reference; 10x allows 0.1 s per image, the rest takes 0.05:
    # 0.1 GFLOP in 0.05 s; compiled spends 0.15 - 0.05 s on it
    assert (bound.scope, bound.batch, bound.ratio) == ("one step", 10, pytest.approx(20.0))
    assert bound.need == pytest.approx(2e9) and bound.have == pytest.approx(1e9) and bound.top == 1e11
    (slow,) = P.igd_bound(igd_suite(P, 0.2), {2: 1e11})
    assert slow.need is None and slow.have == pytest.approx(-1e8 / 0.05)
    # without a ceiling only the ratio is known
    (bare,) = P.igd_bound(records, {})
    assert bare.ratio == pytest.approx(20.0) and bare.have is None and bare.need is None


def test_demo_efficiency(P):
    records = [record("guided_step", "fast", 2.0, 10, best=1.0, flops={"total": 1e10}),
               record("guided_step", "reference", 1.0, best=0.5, flops={"total": 2e9})]
    (e,) = P.demo_efficiency(records, {2: 5e10})
    assert e.per_image == (pytest.approx(1e9), pytest.approx(2e9))
    assert e.rate == (pytest.approx(1e10), pytest.approx(4e9))
    assert (e.path, e.batch, e.top) == ("lgd", 10, 5e10)


def test_training_goal(P):
    group = [record("training", "reference", 1.0, images_per_call=100),
             record("training", "compiled", 0.5, images_per_call=100),
             record("training", "group-loop x5", 1.0, images_per_call=300)]
    best, ratio, goal = P.training_goal(group)
    assert (best.provider, ratio, goal) == ("group-loop x5", pytest.approx(3.0), P.TRAINING_GOALS["demo"])
    assert P.training_goal(group[1:]) is None  # no reference
    assert P.training_goal([record("training", "reference", 1.0, config="other")]) is None  # no goal for it


def counts(**totals) -> dict:
    units = ("lgd_step", "igd_step", "unguided_step", "decode_and_score", "decode", "dit_forward")
    lgd = totals.get("lgd_step", 1.0)
    lgd = {"total": lgd, "dit": lgd / 2, "codec": lgd / 4, "classifiers": lgd / 4}
    return {"nette": {"steps": 50, "lgd_window": [10, 45], "igd_window": [30, 45]},
            "counts": {k: lgd if k == "lgd_step" else {"total": totals.get(k, 0.0)} for k in units}}


def test_sampling_counts_each_unit(P):
    # IPC 100 in increments of 10: 9 LGD stages x 10 classes x 10 images x kappa 3 = 2700 candidates,
    # each with 36 guided steps (window 10..45 of 50), 14 unguided and one final decode; 100 IGD seed
    # images, each with 16 guided (30..45), 34 unguided and a decode
    s = P.sampling(counts(lgd_step=1.0))
    assert s.total == 2700 * 36
    assert s.counted and s.shares == (0.5, 0.25, 0.25) and (s.candidates, s.seed_images) == (2700, 100)
    for unit, per_unit in (("igd_step", 100 * 16), ("unguided_step", 2700 * 14 + 100 * 34),
                           ("decode_and_score", 2700), ("decode", 100)):
        assert P.sampling(counts(**{unit: 1.0})).total - s.total == per_unit, unit


def test_sampling_is_linear_in_the_counts_and_inverse_in_the_rate(P):
    one = P.sampling(counts(lgd_step=2e12, igd_step=2e12, unguided_step=5e11, decode_and_score=6e11, decode=6e11))
    two = P.sampling(counts(lgd_step=4e12, igd_step=4e12, unguided_step=1e12, decode_and_score=1.2e12, decode=1.2e12))
    assert two.total == pytest.approx(2 * one.total) and two.per_candidate == pytest.approx(2 * one.per_candidate)
    assert one.minutes() == pytest.approx(one.total / (P.H100_BF16 * P.UTILISATION) / 60)
    assert one.minutes(utilisation=0.2) == pytest.approx(2 * one.minutes())


def test_sampling_falls_back_to_the_constants(P):
    s = P.sampling(None)
    unguided, lgd = 2 * P.DIT_XL_FORWARD, 2 * (2 * P.DIT_XL_FORWARD + P.SD_VAE_DECODE)
    assert not s.counted and s.shares is None and (s.unguided, s.lgd_step, s.igd_step) == (unguided, lgd, lgd)
    assert s.total == pytest.approx(2700 * (36 * lgd + 14 * unguided + P.SD_VAE_DECODE)
                                    + 100 * (16 * lgd + 34 * unguided + P.SD_VAE_DECODE))


def test_whole_run_counts_every_training(P):
    # every network at 1e15 FLOPs per training image: PFLOP are image-steps
    nets = {n: 1e15 for n in ("convnet6", "resnet_ap10", "resnet18")}
    run = P.whole_run(nets, 50)
    # reference + surrogate 2 x 50 x 9469; stage models on 100 x 2000, 200..400 x 1500 images
    assert run.distill == pytest.approx(100 * 9469 + 100 * 2000 + (200 + 300 + 400) * 1500)
    assert run.evaluate == pytest.approx(3 * 4 * 3 * 500 * 1500)  # 3 networks x 4 sets x 3 runs
    assert run.sampling is None
    assert run.fp32_h == pytest.approx((run.distill + run.evaluate + run.analyze) * 1e15 / (P.H100_FP32 * 0.5) / 3600)
    assert P.whole_run(nets, 10).distill == pytest.approx(100 * 9469)  # one stage: no stage models


def test_whole_run_is_linear_in_the_flops(P):
    one, two = P.whole_run({"convnet6": 1e10}, 100), P.whole_run({"convnet6": 2e10}, 100)
    for field in ("distill", "evaluate", "analyze", "fp32_h", "lone_h", "grouped_h"):
        assert getattr(two, field) == pytest.approx(2 * getattr(one, field)), field
    # the sampling column counts the same units as `sampling` (at IPC 100)
    c = counts(lgd_step=1e15)
    assert P.whole_run({"convnet6": 1e10}, 100, c).sampling == pytest.approx(P.sampling(c).total / 1e15)
    with_sampling = P.whole_run({"convnet6": 1e10}, 100, c)
    assert with_sampling.lone_h - one.lone_h == pytest.approx(2700 * 36 * 1e15 / (P.H100_BF16 * P.UTILISATION) / 3600)
