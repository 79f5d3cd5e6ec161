"""The numbers behind BENCHMARKS.md's verdicts and projections, from records (records.py).

Goals (measured ratios against their targets), the bound on the IGD goals, where the demo
ratios come from, and the FLOP model of a whole ImageNette run projected onto one H100. Returns
numbers and dataclasses; make_table.py writes them out. Stdlib only.
"""
from __future__ import annotations

from dataclasses import dataclass

from records import Record, by_kernel, grouped, provider

# docs/measured-facts.md: used when the meta-device counts (bench_projection.py) are missing.
DIT_XL_FORWARD = 2 * 118.6e9  # FLOPs per image at 256 px
SD_VAE_DECODE = 2 * 311e9
H100_BF16 = 989e12  # dense FLOP/s
H100_FP32, H100_TF32 = 67e12, 495e12
UTILISATION = 0.40  # assumed share of the bf16 peak that the DiT GEMMs and VAE convs reach
IPC, CLASSES = 100, 10
TRAIN_IMAGES, TEST_IMAGES = 9469, 3925  # ImageNette train / val
# bench_projection.py's nette preset, where its count is missing
NETTE = {"steps": 50, "lgd_window": [10, 45], "igd_window": [30, 45], "kappa": 3, "increment": 10,
         "checkpoints": 4, "classes": CLASSES}
GOALS = {"lgd": 5.0, "igd": 10.0}  # fast/reference images/s at the demo config
CEILING_GOAL = 0.50  # fast guided step FLOP/s / fp32 matmul ceiling at DiT-B/2
OP_GOAL = 3.0  # the C++ learnability op vs the torch composition at N=3000, C=1000
TRAINING_GOALS = {"demo": 2.5, "nette": 1.5}  # best fast/group images/s over reference (the training issue)
# Assumed H100 utilisation of classifier training: one small-batch model at a time (batch 64
# ConvNets, short kernels, host overhead) and a vmap group of models (one wide launch).
TRAIN_UTIL_LONE, TRAIN_UTIL_GROUP = 0.25, 0.40
SCOPES = (("guided_step", "one step"), ("guided_sampling", "whole sampling"))


def ceilings(records: list[Record]) -> dict[int, float]:
    """Thread count -> the best fp32 matmul FLOP/s measured with that many threads."""
    best: dict[int, float] = {}
    for r in by_kernel(records, "mm"):
        best[r.threads] = max(r.flops["total"] / r.best, best.get(r.threads, 0.0))
    return best


@dataclass(frozen=True)
class Goal:
    what: str
    threads: int | None
    measured: float  # a ratio, or a share of the matmul ceiling where `share`
    target: float
    share: bool = False

    @property
    def met(self) -> bool:
        return self.measured >= self.target


def goals(records: list[Record], tops: dict[int, float]) -> list[Goal]:
    found = []
    for kernel, scope in SCOPES:
        for kind, target in GOALS.items():
            for group in grouped(by_kernel(records, kernel)).values():
                first = group[0]
                if first.config["preset"] != "demo" or first.config["path"] != kind:
                    continue
                ref = provider(group, "reference")
                for name in ("fast", "compiled"):
                    r = provider(group, name)
                    if r and ref:
                        found.append(Goal(f"{name} {kind.upper()} >= {target:g}x reference images/s (demo, {scope})",
                                          first.threads, r.ips() / ref.ips(), target))
    ops = {r.provider: r for r in by_kernel(records, "learnability")}
    if "cpp" in ops and "torch" in ops:
        cpp = ops["cpp"]
        found.append(Goal(f"learnability op in C++ >= {OP_GOAL:g}x the torch composition "
                          f"(N={cpp.config['N']}, C={cpp.config['C']})",
                          cpp.threads, ops["torch"].median / cpp.median, OP_GOAL))
    for r in by_kernel(records, "guided_step"):
        top = tops.get(r.threads)
        if r.config["preset"] == "dit-b2" and r.provider == "fast" and top:
            found.append(Goal(f"fast {r.config['path'].upper()} step >= {100 * CEILING_GOAL:.0f} % of the fp32 "
                              "matmul ceiling (DiT-B/2)", r.threads, r.flops["total"] / r.best / top, CEILING_GOAL,
                              share=True))
    return found


def influence_flops(records: list[Record]) -> float | None:
    """FLOPs per image of one influence gradient: the surrogate's share of the fast demo IGD step
    (its forward, per-sample backward and the double backward; 'other' holds the latter's convolutions)."""
    for r in by_kernel(records, "guided_step"):
        if r.config["preset"] == "demo" and r.config["path"] == "igd" and r.provider == "fast" and r.flops:
            return (r.flops["classifiers"] + r.flops["other"]) / r.size
    return None


@dataclass(frozen=True)
class Bound:
    """Compiled IGD with its influence gradient replaced by zeros (provider influence-free)."""
    scope: str
    batch: int
    ratio: float  # images/s over the reference's: no faster influence gradient gets past it
    have: float | None  # FLOP/s the compiled influence gradient reaches; None where not known
    need: float | None  # FLOP/s it would need for the IGD goal; None where no rate would do
    top: float | None  # the matmul ceiling


def igd_bound(records: list[Record], tops: dict[int, float]) -> list[Bound]:
    per_image = influence_flops(records)
    found = []
    for kernel, scope in SCOPES:
        for group in grouped(by_kernel(records, kernel)).values():
            free, ref, compiled = (provider(group, name) for name in ("influence-free", "reference", "compiled"))
            if not (free and ref):
                continue
            top = tops.get(free.threads)
            have = need = None
            if per_image and compiled and top:
                # seconds per image: what the goal allows, what everything but the influence gradient takes
                allowed, rest = 1 / (GOALS["igd"] * ref.ips()), 1 / free.ips()
                flops = per_image * free.config.get("guided_steps", 1)
                have = flops / (1 / compiled.ips() - rest)
                need = flops / (allowed - rest) if allowed > rest else None
            found.append(Bound(scope, free.config["batch"], free.ips() / ref.ips(), have, need, top))
    return found


@dataclass(frozen=True)
class Efficiency:
    """A demo step's fast and reference sides: FLOPs per image and the FLOP rate of each."""
    path: str
    batch: int
    per_image: tuple[float, float]  # fast, reference
    rate: tuple[float, float]
    top: float | None


def demo_efficiency(records: list[Record], tops: dict[int, float]) -> list[Efficiency]:
    found = []
    for group in grouped(by_kernel(records, "guided_step")).values():
        fast, ref = provider(group, "fast"), provider(group, "reference")
        if not (fast and ref) or fast.config["preset"] != "demo":
            continue
        found.append(Efficiency(fast.config["path"], fast.config["batch"],
                                tuple(r.flops["total"] / r.size for r in (fast, ref)),
                                tuple(r.flops["total"] / r.best for r in (fast, ref)), tops.get(fast.threads)))
    return found


def training_goal(group: list[Record]) -> tuple[Record, float, float] | None:
    """The fastest non-reference provider, its ratio to the reference and the goal, where the config has one."""
    ref = provider(group, "reference")
    goal = TRAINING_GOALS.get(group[0].config["preset"])
    best = max((r for r in group if r is not ref), key=Record.ips, default=None)
    if ref is None or goal is None or best is None:
        return None
    return best, best.ips() / ref.ips(), goal


@dataclass(frozen=True)
class Sampling:
    """Sampling of ImageNette IPC-100 (the nette preset): FLOPs per image of each kind of step,
    the counts of steps, and their product."""
    counted: bool  # the FLOPs are bench_projection.py's meta-device count, not the constants
    nette: dict
    dit_forward: float
    unguided: float
    lgd_step: float
    igd_step: float
    final: float  # decode + rank scoring of an LGD candidate
    decode: float
    shares: tuple[float, float, float] | None  # of an LGD guided step: DiT, VAE decoder, classifiers
    steps: int
    lgd_guided: int
    igd_guided: int
    stages: int
    candidates: int
    seed_images: int
    per_candidate: float
    per_seed: float
    lgd_total: float
    igd_total: float
    total: float

    def minutes(self, peak: float = H100_BF16, utilisation: float = UTILISATION) -> float:
        return self.total / (peak * utilisation) / 60


def window(nette: dict, kind: str) -> int:
    """Guided steps of a guidance window."""
    return nette[f"{kind}_window"][1] - nette[f"{kind}_window"][0] + 1


def sampling(count: dict | None) -> Sampling:
    """`count`: the extra_info of bench_projection.py's flop_count record, or None for the constants."""
    nette = dict(NETTE)
    if count:
        nette.update(count["nette"])
        c = {k: v["total"] for k, v in count["counts"].items()}
        f_lgd, f_igd, f_u = c["lgd_step"], c["igd_step"], c["unguided_step"]
        f_final, f_dec, f_fwd = c["decode_and_score"], c["decode"], c["dit_forward"]
        parts = count["counts"]["lgd_step"]
        shares = tuple(parts[k] / parts["total"] for k in ("dit", "codec", "classifiers"))
    else:  # backward taken equal to forward; classifiers neglected
        f_fwd, f_dec = DIT_XL_FORWARD, SD_VAE_DECODE
        f_u = 2 * f_fwd
        f_lgd = 2 * (f_u + f_dec)
        f_igd, f_final = f_lgd, f_dec
        shares = None
    n, g_l, g_i = nette["steps"], window(nette, "lgd"), window(nette, "igd")
    stages = IPC // nette["increment"]
    candidates = (stages - 1) * nette["classes"] * nette["increment"] * nette["kappa"]
    seed_images = nette["classes"] * nette["increment"]
    per_cand = g_l * f_lgd + (n - g_l) * f_u + f_final
    per_seed = g_i * f_igd + (n - g_i) * f_u + f_dec
    total_lgd, total_igd = candidates * per_cand, seed_images * per_seed
    return Sampling(bool(count), nette, f_fwd, f_u, f_lgd, f_igd, f_final, f_dec, shares, n, g_l, g_i, stages,
                    candidates, seed_images, per_cand, per_seed, total_lgd, total_igd, total_lgd + total_igd)


@dataclass(frozen=True)
class WholeRun:
    """One whole nette run at `ipc`: PFLOP of sampling and of the classifier trainings, and the
    H100 hours of all of it under three assumptions for training."""
    ipc: int
    sampling: float | None  # None without bench_projection.py's count
    distill: float
    evaluate: float
    analyze: float
    fp32_h: float  # the reference loop's fp32 training
    lone_h: float  # bf16, one model at a time
    grouped_h: float  # bf16, evaluate and analyze in vmap groups


def hard_label_epochs(ipc: int) -> int:
    return 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000


def whole_run(flops_per_image: dict[str, float], ipc: int, count: dict | None = None) -> WholeRun:
    """`flops_per_image`: network -> forward + backward FLOPs of one 224 px training image
    (bench_training.py); `count`: as for `sampling`. Test scoring counts a third of a training
    image per test image (forward only)."""
    f, classes, epochs = flops_per_image, CLASSES, hard_label_epochs
    stages = ipc // 10
    distill = 50 * TRAIN_IMAGES + 50 * TRAIN_IMAGES  # reference model (50 epochs) + IGD surrogate (50 epochs)
    distill += sum(10 * k * classes * epochs(10 * k) for k in range(1, stages))  # stage models on D_1..D_{K-1}
    per_training = ipc * classes * epochs(ipc)
    evaluate = {net: 4 * 3 * per_training for net in f}  # 4 sets x 3 runs per network
    per_set = stages * 10 * classes * epochs(10)  # cross-increment: one model per increment
    phase = epochs(ipc) // stages
    per_set += sum(phase * 10 * k * classes for k in range(1, stages + 1))  # dynamics training
    per_set += epochs(ipc) * TEST_IMAGES / 3  # dynamics: the test set scored every epoch
    per_set += per_training + epochs(ipc) * ipc * classes / 3  # cartography + its per-epoch tracking
    analyze = 3 * per_set  # lgd, dit, igd on convnet6

    def pflop(steps, net="convnet6"):
        return steps * f[net] / 1e15

    d, e, a = pflop(distill), sum(pflop(v, n) for n, v in evaluate.items()), pflop(analyze)
    sample = None
    if count:
        c = {k: v["total"] for k, v in count["counts"].items()}
        nette = count["nette"]
        n, g_l, g_i = nette["steps"], window(nette, "lgd"), window(nette, "igd")
        per_cand = g_l * c["lgd_step"] + (n - g_l) * c["unguided_step"] + c["decode_and_score"]
        per_seed = g_i * c["igd_step"] + (n - g_i) * c["unguided_step"] + c["decode"]
        sample = ((stages - 1) * classes * 10 * 3 * per_cand + classes * 10 * per_seed) / 1e15
    fp32_h = (d + e + a) * 1e15 / (H100_FP32 * 0.5) / 3600
    lone = (d + e + a) * 1e15 / (H100_BF16 * TRAIN_UTIL_LONE) / 3600
    grouped_h = (d * 1e15 / (H100_BF16 * TRAIN_UTIL_LONE) + (e + a) * 1e15 / (H100_BF16 * TRAIN_UTIL_GROUP)) / 3600
    samp_h = sample * 1e15 / (H100_BF16 * UTILISATION) / 3600 if sample is not None else 0.0
    return WholeRun(ipc, sample, d, e, a, fp32_h + samp_h, lone + samp_h, grouped_h + samp_h)
