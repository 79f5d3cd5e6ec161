"""Write BENCHMARKS.md from one or more pytest-benchmark JSON files.

    python benchmarks/make_table.py bench.json [more.json ...] [-o BENCHMARKS.md]

Sections: machine and versions; the fp32 matmul ceiling; per benchmark group a table of
images/s, the fast/reference ratio, FLOP/s and % of the ceiling; peak memory; the top ops of
the profiled fast steps; the goals; a projection of a full ImageNette IPC-100 run on one H100
from the FLOP counts. Groups this script does not know get a plain timing table.
Reads only the JSON (no torch), so it runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

MiB = 2**20
# docs/engineering.md: used when the meta-device counts (bench_projection.py) are missing.
DIT_XL_FORWARD = 2 * 118.6e9  # FLOPs per image at 256 px
SD_VAE_DECODE = 2 * 311e9
H100_BF16 = 989e12  # dense FLOP/s
H100_FP32, H100_TF32 = 67e12, 495e12
UTILISATION = 0.40  # assumed share of the bf16 peak that the DiT GEMMs and VAE convs reach
IPC, CLASSES = 100, 10
GOALS = {"lgd": 5.0, "igd": 10.0}  # fast/reference images/s at the demo config
CEILING_GOAL = 0.50  # fast guided step FLOP/s / fp32 matmul ceiling at DiT-B/2
OP_GOAL = 3.0  # the C++ learnability op vs the torch composition at N=3000, C=1000


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    runs, benchmarks = [], []
    for path in paths:
        data = json.loads(path.read_text())
        runs.append({"file": str(path), "datetime": data.get("datetime"), "version": data.get("version"),
                     "machine": data.get("machine_info", {})})
        benchmarks += data.get("benchmarks", [])
    return runs, benchmarks


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def ips(b: dict, stat: str = "median") -> float:
    if "images_per_call" in b["extra_info"]:
        return b["extra_info"]["images_per_call"] / b["stats"][stat]
    return b["extra_info"]["images"] / b["stats"][stat]


def by_kernel(benchmarks: list[dict], kernel: str) -> list[dict]:
    return [b for b in benchmarks if b.get("extra_info", {}).get("kernel") == kernel]


def threads(b: dict) -> int | None:
    return b.get("extra_info", {}).get("threads")


def grouped(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """Benchmarks by group; the thread count joins the name when the files hold several."""
    mixed = len({threads(b) for b in benchmarks}) > 1
    groups = defaultdict(list)
    for b in benchmarks:
        name = b["group"] or b["name"]
        groups[f"{name} | {threads(b)} thread(s)" if mixed else name].append(b)
    return groups


def provider(group: list[dict], name: str) -> dict | None:
    return next((b for b in group if b["extra_info"].get("provider") == name), None)


def pair(group: list[dict]) -> tuple[dict | None, dict | None]:
    return provider(group, "fast"), provider(group, "reference")


def vs_reference(b: dict, group: list[dict]) -> str:
    """images/s of a batched provider over the reference's, bold, or "" for the reference."""
    ref = provider(group, "reference")
    if b is ref or ref is None:
        return ""
    return f"**{ips(b) / ips(ref):.2f}x**"


def first_call(b: dict) -> str:
    s = b["extra_info"].get("first_call_s")
    return fmt(s) if s is not None else "-"


ORDER = {"fast": 0, "compiled": 1, "influence-free": 2, "reference": 3}


def by_provider(group: list[dict]) -> list[dict]:
    return sorted(group, key=lambda b: ORDER.get(b["extra_info"]["provider"], 3))


# ---------------------------------------------------------------------------------------------
# Sections


def machine_section(runs: list[dict], benchmarks: list[dict]) -> list[str]:
    m = runs[0]["machine"]
    cpu = m.get("cpu", {})
    info = [b["extra_info"] for b in benchmarks if "load_1min" in b.get("extra_info", {})]
    first = info[0] if info else {}
    loads = [i["load_1min"] for i in info if "load_1min" in i]
    hz = (cpu.get("hz_actual") or [0])[0]
    cores = first.get("cores") or cpu.get("count")
    lines = ["## Machine", ""]
    lines.append(f"- CPU: {first.get('cpu') or cpu.get('brand_raw', '?')}, {cores} cores"
                 + (f" at {hz / 1e9:.2f} GHz" if hz else "") + f", {m.get('system', '')} {m.get('release', '')}")
    if hz and cores:
        lines.append(f"- Nominal fp32 peak {cores * hz * 32 / 1e9:.0f} GFLOP/s at the listed clock (cores x clock x "
                     "32 FLOP/cycle: two 256-bit FMA pipes per core, AVX2, no AVX-512); boost clocks run higher, "
                     "so the measured matmul rate below can exceed it")
    counts = " and ".join(str(t) for t in sorted({i["threads"] for i in info})) or "?"
    lines.append(f"- Threads: {counts} intra-op (torch.set_num_threads; LGD_BENCH_THREADS), "
                 f"{first.get('interop_threads', '?')} inter-op; fp32 everywhere; learnability op: "
                 f"{first.get('learnability_op', '?')}")
    lines.append(f"- Versions: Python {m.get('python_version', '?')}, torch {first.get('torch', '?')}, diffusers "
                 f"{first.get('diffusers', '?')}, pytest-benchmark {runs[0]['version']}")
    lines.append("- Run: " + ", ".join(f"{r['datetime']} ({r['file']})" for r in runs))
    if loads:
        lines.append(f"- 1-minute load average at the start of each benchmark: {min(loads):.1f} .. {max(loads):.1f} "
                     f"(median {statistics.median(loads):.1f}) on {cores} cores")
    lines += ["", "The machine is shared with other developers: a load above "
              f"{cores} means other processes took CPU time from these runs. With 2 threads that costs more than "
              "the lost share: every parallel op waits at its OpenMP barrier for a thread that is not "
              "scheduled, so small ops (the demo's elementwise work, the reference path's batch-1 ops) "
              "can take milliseconds instead of microseconds. Times are noisy (often by 2x or more) and "
              "fast/reference ratios measured minutes apart inherit that noise; a 1-thread run, where "
              "present, is the control that does not suffer from barrier waits. images/s use the median "
              "round; FLOP/s and the matmul ceiling use the best round (the least disturbed) on both sides.", ""]
    return lines


def ceilings(benchmarks: list[dict]) -> dict[int, float]:
    """Thread count -> the best fp32 matmul FLOP/s measured with that many threads."""
    best: dict[int, float] = {}
    for b in by_kernel(benchmarks, "mm"):
        rate = b["extra_info"]["flops"]["total"] / b["stats"]["min"]
        best[threads(b)] = max(rate, best.get(threads(b), 0.0))
    return best


def matmul_section(benchmarks: list[dict]) -> list[str]:
    rows = []
    for b in sorted(by_kernel(benchmarks, "mm"), key=lambda b: (threads(b), b["extra_info"]["n"])):
        flops = b["extra_info"]["flops"]["total"]
        rows.append([threads(b), f"{b['extra_info']['n']}^2", b["stats"]["rounds"],
                     fmt(flops / b["stats"]["min"] / 1e9), fmt(flops / b["stats"]["median"] / 1e9)])
    if not rows:
        return []
    used = ", ".join(f"{t} thread(s): **{rate / 1e9:.1f} GFLOP/s**" for t, rate in sorted(ceilings(benchmarks).items()))
    return (["## fp32 matmul ceiling", "", "`torch.mm` of two n x n fp32 matrices, 2 n^3 FLOPs per call.", ""]
            + table(["threads", "n", "rounds", "GFLOP/s (best)", "GFLOP/s (median)"], rows)
            + [f"Ceilings used below (best call over sizes): {used}.", ""])


def step_rows(group: list[dict], tops: dict[int, float]) -> list[list]:
    rows = []
    for b in by_provider(group):
        e = b["extra_info"]
        flops = e.get("flops", {}).get("total")
        rate = flops / b["stats"]["min"] if flops else None
        top = tops.get(threads(b))
        rows.append([e["provider"], e["batch"], e["images"], first_call(b), b["stats"]["rounds"],
                     fmt(b["stats"]["median"]), fmt(ips(b)), fmt(ips(b, "min")), vs_reference(b, group),
                     fmt(flops / e["images"] / 1e9) if flops else "-", fmt(rate / 1e9) if rate else "-",
                     f"{100 * rate / top:.1f} %" if rate and top else "-"])
    return rows


def step_section(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    steps = by_kernel(benchmarks, "guided_step")
    if not steps:
        return []
    lines = ["## One guided step", "",
             "One reverse step inside both guidance windows (respaced index 0.8 N of N: 40 of 50 at DiT-B/2, "
             "20 of 25 at the demo preset): CFG forward of the "
             "DiT, DDPM step, VAE decode of the Tweedie estimate, classifiers, backward to x_t, deviation "
             "guidance. fast = all candidates as one batch (fused learnability op / batched vmap influence "
             "loss); compiled = fast with `sampling.compile` (DiT, VAE decoder and influence gradient under "
             "torch.compile; its first call compiles and is timed apart, as 'first call s': graphs that an "
             "earlier case of the session compiled for the same shapes are reused, and inductor's on-disk cache "
             "(TORCHINDUCTOR_CACHE_DIR) turns a compile into a load of seconds, so a small figure there means no "
             "new graph or a warm cache; FLOPs counted on the eager fast call, the same ops); influence-free = "
             "compiled with IGD's influence gradient replaced by zeros, a bound rather than a way to sample (FLOPs not "
             "counted); reference = one image at a time (plain learnability / one backward per surrogate "
             "checkpoint). FLOPs: FlopCounterMode on one call (matmul, conv, attention; forward and "
             "backward; elementwise ops, norms and softmax count zero).", ""]
    header = ["provider", "batch", "images/call", "first call s", "rounds", "s/call (median)", "images/s (median)",
              "images/s (best)", "x reference", "GFLOP/image", "GFLOP/s (best)", "% of ceiling"]
    for name, group in grouped(steps).items():
        e = group[0]["extra_info"]
        lines += [f"### {name}", "", _config_line(e), ""] + table(header, step_rows(group, tops))
    lines += ["### FLOPs per image of one guided step, by part (GFLOP)", ""]
    rows, seen = [], set()
    for b in steps:
        e, f = b["extra_info"], b["extra_info"]["flops"]
        n = e["images"]
        if e["provider"] in ("compiled", "influence-free") or (e["config"], e["path"], e["provider"]) in seen:
            # compiled: counted on the eager fast call; influence-free: not counted; FLOPs do not
            # depend on the thread count
            continue
        seen.add((e["config"], e["path"], e["provider"]))
        parts = ("total", "dit", "codec", "classifiers", "other")
        rows.append([e["config"], e["path"].upper(), e["provider"]] + [fmt(f[k] / n / 1e9) for k in parts])
    lines += table(["config", "guidance", "provider", "total", "DiT", "codec", "classifiers", "other"], rows)
    lines += ["'other' ran outside every module's forward and backward hooks: for IGD the second-order "
              "(double-backward) convolutions through the surrogate. The reference IGD step runs E backward "
              "passes through DiT and decoder, the fast one a single pass. Counting notes: torch 2.13's "
              "FlopCounterMode counts CPU attention (`_scaled_dot_product_flash_attention_for_cpu`) as zero and "
              "the weight gradient of a grouped convolution `groups` times over (vmap's per-sample gradients "
              "are grouped convs with groups = batch); benchmarks/_measure.py supplies correct formulas for both.",
              ""]
    return lines


def _config_line(e: dict) -> str:
    d = e["dit"]
    return (f"DiT hidden {d['hidden']}, depth {d['depth']}, {d['heads']} heads, patch {d['patch']}, "
            f"{d['tokens']} tokens ({d['params'] / 1e6:.1f} M params); latents {'x'.join(map(str, e['latent']))}; "
            f"codec {e['codec']}; classifiers {e['classifiers']}; IGD surrogate {e['surrogate']}; "
            f"weights: {e['weights']}.")


def sampling_section(benchmarks: list[dict]) -> list[str]:
    runs = by_kernel(benchmarks, "guided_sampling")
    if not runs:
        return []
    lines = ["## Whole guided sampling of one unit", "",
             "`Distiller.sample_candidates` (the pipeline's unit sampler). The demo runs its preset's whole "
             "25-step schedule; DiT-B/2 a short respaced schedule (the 50-step one takes minutes per unit "
             "here) with the guidance window at the same fraction of it. One timed round (compiled and "
             "influence-free: after a first unit that compiles every graph, timed apart).", ""]
    header = ["provider", "batch", "images/call", "first call s", "steps", "guided steps", "window", "s/call",
              "images/s", "x reference"]
    for name, group in grouped(runs).items():
        rows = []
        for b in by_provider(group):
            e = b["extra_info"]
            rows.append([e["provider"], e["batch"], e["images"], first_call(b), e["steps"], e["guided_steps"],
                         f"{e['window'][0]}..{e['window'][1]}", fmt(b["stats"]["median"]), fmt(ips(b)),
                         vs_reference(b, group)])
        e = group[0]["extra_info"]
        share, full_share = e["guided_steps"] / e["steps"], e["full_guided_steps"] / e["full_steps"]
        lines += [f"### {name}", "", f"Guided share {share:.0%} of {e['steps']} steps; the {e['full_steps']}-step "
                  f"original guides {e['full_window'][0]}..{e['full_window'][1]}, {e['full_guided_steps']} steps "
                  f"({full_share:.0%}).", ""] + table(header, rows)
    return lines


def memory_section(benchmarks: list[dict]) -> list[str]:
    runs = by_kernel(benchmarks, "guided_step_memory")
    if not runs:
        return []
    lines = ["## Peak memory of one guided step", "",
             "Method (benchmarks/_measure.py), one profiled call each: **RSS peak** = the process's "
             "VmHWM after the call minus VmRSS before it, with the high-water mark reset by writing 5 to "
             "/proc/self/clear_refs after gc + malloc_trim(0) returned freed heap pages; **allocator peak** "
             "= the peak of torch's live CPU allocations during the call, replayed from "
             "torch.profiler(profile_memory=True) events. (tracemalloc cannot see tensor storage.)", ""]
    header = ["config", "guidance", "provider", "threads", "images", "RSS peak MiB", "per image", "allocator peak MiB",
              "per image", "fast/ref per image (allocator)"]
    rows = []
    for name, group in grouped(runs).items():
        for kind in ("lgd", "igd"):
            sub = [b for b in group if b["extra_info"]["path"] == kind]
            fast, ref = pair(sub)
            per = lambda b: b["extra_info"]["alloc_peak"] / b["extra_info"]["images"]
            for b in sorted(sub, key=lambda b: b["extra_info"]["provider"]):
                e = b["extra_info"]
                rss = e.get("rss_peak")
                ratio = per(fast) / per(ref) if b is fast and ref and per(ref) else None
                rows.append([e["config"], kind.upper(), e["provider"], e["threads"], e["images"],
                             fmt(rss / MiB) if rss is not None else "-",
                             fmt(rss / MiB / e["images"]) if rss is not None else "-",
                             fmt(e["alloc_peak"] / MiB), fmt(e["alloc_peak"] / MiB / e["images"]),
                             f"{ratio:.2f}" if ratio else ""])
    return lines + table(header, rows)


def profile_section(benchmarks: list[dict], count: int = 12) -> list[str]:
    runs = [b for b in by_kernel(benchmarks, "guided_step_memory")
            if b["extra_info"]["provider"] == "fast" and b["extra_info"]["config"] == "demo"]
    if not runs:
        return []
    lines = ["## Profile of one fast guided step at the demo config", "",
             "torch.profiler, CPU activities, the same call as the memory row; top ops by self CPU time.", ""]
    for b in runs:
        e = b["extra_info"]
        lines += [f"### {e['path'].upper()}, batch {e['batch']}, {e['threads']} thread(s) "
                  f"({e['profiled_cpu_ms'] / 1e3:.2f} s self CPU in total)", ""]
        rows = [[o["op"], fmt(o["self_ms"]), f"{100 * o['share']:.1f} %", o["calls"]] for o in e["top_ops"][:count]]
        lines += table(["op", "self ms", "share", "calls"], rows)
    return lines


def goals_section(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    rows = []
    for kernel, what in (("guided_step", "one step"), ("guided_sampling", "whole sampling")):
        for kind, goal in GOALS.items():
            for group in grouped(by_kernel(benchmarks, kernel)).values():
                e = group[0]["extra_info"]
                if e["config"] != "demo" or e["path"] != kind:
                    continue
                ref = provider(group, "reference")
                for name in ("fast", "compiled"):
                    b = provider(group, name)
                    if b and ref:
                        ratio = ips(b) / ips(ref)
                        rows.append([f"{name} {kind.upper()} >= {goal:g}x reference images/s (demo, {what})",
                                     e["threads"], f"{ratio:.2f}x", "yes" if ratio >= goal else "**no**"])
    ops = {b["extra_info"]["provider"]: b for b in by_kernel(benchmarks, "learnability")}
    if "cpp" in ops and "torch" in ops:
        ratio = ops["torch"]["stats"]["median"] / ops["cpp"]["stats"]["median"]
        e = ops["cpp"]["extra_info"]
        rows.append([f"learnability op in C++ >= {OP_GOAL:g}x the torch composition (N={e['N']}, C={e['C']})",
                     e["threads"], f"{ratio:.2f}x", "yes" if ratio >= OP_GOAL else "**no**"])
    for b in by_kernel(benchmarks, "guided_step"):
        e = b["extra_info"]
        top = tops.get(threads(b))
        if e["config"] == "dit-b2" and e["provider"] == "fast" and top:
            share = e["flops"]["total"] / b["stats"]["min"] / top
            rows.append([f"fast {e['path'].upper()} step >= {100 * CEILING_GOAL:.0f} % of the fp32 matmul "
                         "ceiling (DiT-B/2)", e["threads"], f"{100 * share:.1f} %",
                         "yes" if share >= CEILING_GOAL else "**no**"])
    if not rows:
        return []
    return (["## Goals", "", "On a loaded shared machine the 2-thread verdicts can flip from one run to the next "
             "(see Machine); the 1-thread rows, where present, are the stable comparison.", ""]
            + table(["goal", "threads", "measured", "met"], rows) + igd_bound(benchmarks, tops)
            + demo_efficiency(benchmarks, tops))


def influence_flops(benchmarks: list[dict]) -> float | None:
    """FLOPs per image of one influence gradient: the surrogate's share of the fast demo IGD step
    (its forward, per-sample backward and the double backward; 'other' holds the latter's convolutions)."""
    for b in by_kernel(benchmarks, "guided_step"):
        e = b["extra_info"]
        if e["config"] == "demo" and e["path"] == "igd" and e["provider"] == "fast" and e.get("flops"):
            return (e["flops"]["classifiers"] + e["flops"]["other"]) / e["images"]
    return None


def igd_bound(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    """What compiled IGD would reach if its influence gradient cost nothing (provider influence-free),
    and the FLOP rate the influence gradient would need for the goal."""
    per_image = influence_flops(benchmarks)
    found, needs = [], []
    for kernel, what in (("guided_step", "one step"), ("guided_sampling", "whole sampling")):
        for group in grouped(by_kernel(benchmarks, kernel)).values():
            free, ref, compiled = (provider(group, name) for name in ("influence-free", "reference", "compiled"))
            if not (free and ref):
                continue
            e = free["extra_info"]
            found.append(f"{ips(free) / ips(ref):.2f}x ({what}, batch {e['batch']})")
            top = tops.get(threads(free))
            if not (per_image and compiled and top):
                continue
            # seconds per image: what the goal allows, what everything but the influence gradient takes
            allowed, rest = 1 / (GOALS["igd"] * ips(ref)), 1 / ips(free)
            flops = per_image * e.get("guided_steps", 1)
            have = flops / (1 / ips(compiled) - rest)
            rate = flops / (allowed - rest) if allowed > rest else None
            need = (f"{rate / 1e9:.0f} GFLOP/s ({100 * rate / top:.0f} % of the matmul ceiling)" if rate
                    else "more than any rate: the rest alone is too slow")
            needs.append(f"{what}: {need}, against {have / 1e9:.0f} GFLOP/s ({100 * have / top:.0f} %) compiled")
    if not found:
        return []
    lines = [f"Bound on the IGD goals: with the influence gradient replaced by zeros and every other cost of "
             f"the compiled path kept (provider influence-free: decode, the backward through decoder and DiT, "
             f"deviation, the unguided steps), compiled IGD reaches {' and '.join(found)} of the reference. "
             "No faster influence gradient can take the compiled path past these ratios; the rest of the step "
             "would have to get faster too.", ""]
    if needs:
        lines += [f"For {GOALS['igd']:g}x with the rest as measured, the influence gradient "
                  f"({per_image / 1e9:.3g} GFLOP per image and guided step) would have to run at "
                  + "; ".join(needs) + ".", ""]
    return lines


def demo_efficiency(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    """Where a demo step ratio comes from: FLOPs per image and the FLOP rate of each side."""
    lines = []
    for group in grouped(by_kernel(benchmarks, "guided_step")).values():
        fast, ref = pair(group)
        if not (fast and ref) or fast["extra_info"]["config"] != "demo":
            continue
        top = tops.get(threads(fast))
        per_image = [b["extra_info"]["flops"]["total"] / b["extra_info"]["images"] for b in (fast, ref)]
        rates = [b["extra_info"]["flops"]["total"] / b["stats"]["min"] for b in (fast, ref)]
        ceiling = f" ({100 * rates[0] / top:.0f} % of the matmul ceiling)" if top else ""
        lines.append(f"- demo {fast['extra_info']['path'].upper()} step: {per_image[0] / 1e9:.3g} GFLOP per image fast, "
                     f"{per_image[1] / 1e9:.3g} reference; fast {rates[0] / 1e9:.0f} GFLOP/s{ceiling} at batch "
                     f"{fast['extra_info']['batch']}, reference {rates[1] / 1e9:.0f} GFLOP/s one image at a time.")
    if not lines:
        return []
    return (["Where the demo ratios come from: the demo's models are small (16-32-channel convolutions, a "
             "1.3 M-parameter DiT), so the fast path's gain is the FLOP-rate gain of batching, plus the FLOPs "
             "IGD's single backward saves:", ""] + lines + [""])


def projection_section(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    counted = by_kernel(benchmarks, "flop_count")
    nette = {"steps": 50, "lgd_window": [10, 45], "igd_window": [30, 45], "kappa": 3, "increment": 10,
             "checkpoints": 4, "classes": CLASSES}
    if counted:
        e = counted[0]["extra_info"]
        nette.update(e["nette"])
        c = {k: v["total"] for k, v in e["counts"].items()}
        source = ("counted with FlopCounterMode on the meta device by bench_projection.py: DiT-XL/2 @ 256 px, "
                  "SD-VAE decoder, ConvNet-6 @ 224 px")
        f_lgd, f_igd, f_u = c["lgd_step"], c["igd_step"], c["unguided_step"]
        f_final, f_dec, f_fwd = c["decode_and_score"], c["decode"], c["dit_forward"]
        parts = e["counts"]["lgd_step"]
        shares = ("Of an LGD guided step, the DiT is {:.0%}, the VAE decoder {:.0%} and the classifiers {:.0%} "
                  "of the FLOPs.").format(*(parts[k] / parts["total"] for k in ("dit", "codec", "classifiers")))
    else:
        source = "docs/engineering.md constants (backward taken equal to forward; classifiers neglected)"
        f_fwd, f_dec = DIT_XL_FORWARD, SD_VAE_DECODE
        f_u = 2 * f_fwd
        f_lgd = 2 * (f_u + f_dec)
        f_igd, f_final = f_lgd, f_dec
        shares = ""
    n = nette["steps"]
    g_l = nette["lgd_window"][1] - nette["lgd_window"][0] + 1
    g_i = nette["igd_window"][1] - nette["igd_window"][0] + 1
    stages = IPC // nette["increment"]
    lgd_stages = stages - 1
    per_stage = nette["classes"] * nette["increment"] * nette["kappa"]
    candidates = lgd_stages * per_stage
    seed_images = nette["classes"] * nette["increment"]
    per_cand = g_l * f_lgd + (n - g_l) * f_u + f_final
    per_seed = g_i * f_igd + (n - g_i) * f_u + f_dec
    total_lgd, total_igd = candidates * per_cand, seed_images * per_seed
    total = total_lgd + total_igd
    rate = H100_BF16 * UTILISATION
    T = lambda x: f"{x / 1e12:,.1f} TFLOP"
    G = lambda x: f"{x / 1e9:,.1f} GFLOP"
    lines = ["## Projection: ImageNette IPC-100 on one H100", "",
             f"FLOPs per image ({source}):", "",
             f"- DiT-XL/2 forward: {G(f_fwd)} (docs/engineering.md: 118.6 GMAC = 237.2 GFLOP)",
             f"- unguided step (CFG: DiT forward on 2 images): {G(f_u)}",
             f"- LGD guided step (CFG forward, backward through DiT, SD-VAE decoder forward + backward, two "
             f"ConvNet-6 forward + backward): {G(f_lgd)}",
             f"- IGD guided step, fast path (as LGD, surrogate double backward over E={nette['checkpoints']} "
             f"checkpoints, one backward to x_t): {G(f_igd)}",
             f"- final decode + rank scoring: {G(f_final)}; decode alone: {G(f_dec)}", "",
             f"Counts: IPC {IPC} in increments of {nette['increment']} = {stages} stages: stage 1 is the IGD seed, "
             f"stages 2..{stages} are {lgd_stages} LGD stages. {n} steps; LGD window "
             f"{nette['lgd_window'][0]}..{nette['lgd_window'][1]} = {g_l} guided + {n - g_l} unguided; IGD window "
             f"{nette['igd_window'][0]}..{nette['igd_window'][1]} = {g_i} guided + {n - g_i} unguided.", "",
             "```",
             f"LGD candidates  = {lgd_stages} stages x {nette['classes']} classes x {nette['increment']} new images "
             f"x kappa {nette['kappa']} = {candidates:,}",
             f"per candidate   = {g_l} x {G(f_lgd)} + {n - g_l} x {G(f_u)} + {G(f_final)} = {T(per_cand)}",
             f"LGD stages      = {candidates:,} x {T(per_cand)} = {total_lgd / 1e15:,.1f} PFLOP",
             f"IGD seed images = {nette['classes']} classes x {nette['increment']} = {seed_images}",
             f"per seed image  = {g_i} x {G(f_igd)} + {n - g_i} x {G(f_u)} + {G(f_dec)} = {T(per_seed)}",
             f"IGD seed        = {seed_images} x {T(per_seed)} = {total_igd / 1e15:,.2f} PFLOP",
             f"total           = {total / 1e15:,.1f} PFLOP",
             f"H100 bf16 dense {H100_BF16 / 1e12:.0f} TFLOP/s x assumed utilisation {UTILISATION:.0%} "
             f"= {rate / 1e12:.0f} TFLOP/s",
             f"time            = {total / 1e15:,.1f} PFLOP / {rate / 1e12:.0f} TFLOP/s = {total / rate:,.0f} s "
             f"= {total / rate / 60:.1f} min",
             "```", "",
             f"Utilisation {UTILISATION:.0%} is an assumption (large bf16 GEMMs reach 60-70 % of the H100 peak, "
             "the decoder's GroupNorm/SiLU and the batch-30 backward less); at 25 % the run takes "
             f"{total / (H100_BF16 * 0.25) / 60:.0f} min, at 60 % {total / (H100_BF16 * 0.6) / 60:.0f} min. In fp32 "
             f"(67 TFLOP/s peak) it would take {total / (H100_FP32 * UTILISATION) / 60:.0f} min, in tf32 "
             f"{total / (H100_TF32 * UTILISATION) / 60:.0f} min, at the same utilisation. {shares}", "",
             "Not counted: training the classifiers (the reference model, one stage model per LGD stage, IGD's "
             "50-epoch surrogate trajectory and checkpoint selection), the evaluation, and the full-IPC DiT and "
             f"IGD baselines (the IGD baseline alone is {IPC // nette['increment']}x the seed increment). The "
             f"official IGD loop (one image at a time, E={nette['checkpoints']} backward passes through DiT and "
             "decoder per guided step, graphs at all 50 steps) would cost more than the fast path counted here.", ""]
    if tops:
        top = max(tops.values())
        lines += [f"For scale: at this CPU's measured fp32 matmul ceiling ({top / 1e9:.0f} GFLOP/s) the same "
                  f"FLOPs would take {total / top / 86400:,.0f} days.", ""]
    return lines


TRAINING_GOALS = {"demo": 2.5, "nette": 1.5}  # best fast/group images/s over reference (the training issue)
# Assumed H100 utilisation of classifier training: one small-batch model at a time (batch 64
# ConvNets, short kernels, host overhead) and a vmap group of models (one wide launch).
TRAIN_UTIL_LONE, TRAIN_UTIL_GROUP = 0.25, 0.40


def training_section(benchmarks: list[dict], tops: dict[int, float]) -> list[str]:
    runs = by_kernel(benchmarks, "training")
    if not runs:
        return []
    top = max(tops.values()) if tops else None
    lines = ["## Classifier training", "",
             "`benchmarks/bench_training.py`: `train_classifiers` from fresh models; images/s counts every "
             "member's training images. GFLOP/s from the per-image forward + backward FLOPs (FlopCounterMode, "
             "meta device); % ceiling against the fp32 matmul ceiling of the same run. This section alone is "
             "regenerated with `python -m pytest benchmarks/bench_training.py benchmarks/bench_matmul.py "
             "benchmarks/bench_projection.py --benchmark-only --benchmark-json=t.json` and "
             "`python benchmarks/make_table.py t.json --update` (the JSON of this run: "
             "`benchmarks/results/training.json`).", ""]
    for name, group in grouped(runs).items():
        ref = next((b for b in group if b["extra_info"]["provider"] == "reference"), None)
        rows = []
        for b in group:
            e = b["extra_info"]
            rate = ips(b)
            flops = rate * e["flops_per_image"]
            rows.append([e["provider"], e["members"], fmt(rate), fmt(rate / ips(ref), 2) + "x" if ref else "",
                         fmt(flops / 1e9), f"{flops / top:.0%}" if top else "",
                         fmt(e.get("first_call_s"), 2) if e.get("first_call_s") is not None else ""])
        e0 = group[0]["extra_info"]
        lines += [f"### {name}", "",
                  f"{e0['network']} width {e0['width']} at {e0['size']} px, {e0['channels']} channel(s), "
                  f"{e0['images']} images, {e0['recipe']} recipe, {e0['epochs']} epoch(s) per call, "
                  f"{e0['flops_per_image'] / 1e6:,.1f} MFLOP per training image.", ""]
        lines += table(["provider", "members", "images/s", "x reference", "GFLOP/s", "% ceiling", "first call s"], rows)
        config = e0["config"]
        if ref and config in TRAINING_GOALS:
            best = max((b for b in group if b is not ref), key=ips, default=None)
            if best is not None:
                ratio = ips(best) / ips(ref)
                goal = TRAINING_GOALS[config]
                lines += [f"Goal: >= {goal}x the reference. Best: {best['extra_info']['provider']} at "
                          f"{ratio:.2f}x ({'met' if ratio >= goal else 'not met'}).", ""]
    return lines


def training_projection(benchmarks: list[dict]) -> list[str]:
    """Whole nette run (IPC 50 and 100) on one H100: sampling (as above) plus every training."""
    counted = by_kernel(benchmarks, "training_flop_count")
    sampling = by_kernel(benchmarks, "flop_count")
    if not counted:
        return []
    f = counted[0]["extra_info"]["flops_per_image"]
    train_images, test_images, classes = 9469, 3925, CLASSES  # ImageNette train / val, 10 classes
    lines = ["## Projection: a whole ImageNette run on one H100", "",
             "Image-steps (one training image through forward + backward) of every classifier training in "
             "the `nette` preset's distill, evaluate and analyze, times the per-image FLOPs counted by "
             "bench_training.py at 224 px: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP" for k, v in f.items()) + ". "
             "Test scoring counts a third of a training image per test image (forward only).", ""]
    rows = []
    for ipc in (50, 100):
        epochs = lambda n_ipc: 2000 if n_ipc <= 10 else 1500 if n_ipc <= 50 else 1000  # hard_label by IPC
        stages = ipc // 10
        distill = 50 * train_images + 50 * train_images  # reference model (50 epochs) + IGD surrogate (50 epochs)
        distill += sum(10 * k * classes * epochs(10 * k) for k in range(1, stages))  # stage models on D_1..D_{K-1}
        per_training = ipc * classes * epochs(ipc)
        evaluate = {net: 4 * 3 * per_training for net in f}  # 4 sets x 3 runs per network
        per_set = stages * 10 * classes * epochs(10)  # cross-increment: one model per increment
        phase = epochs(ipc) // stages
        per_set += sum(phase * 10 * k * classes for k in range(1, stages + 1))  # dynamics training
        per_set += epochs(ipc) * test_images / 3  # dynamics: the test set scored every epoch
        per_set += per_training + epochs(ipc) * ipc * classes / 3  # cartography + its per-epoch tracking
        analyze = 3 * per_set  # lgd, dit, igd on convnet6
        pf = lambda steps, net="convnet6": steps * f[net] / 1e15
        d, e, a = pf(distill), sum(pf(v, n) for n, v in evaluate.items()), pf(analyze)
        sample = None
        if sampling:
            c = {k: v["total"] for k, v in sampling[0]["extra_info"]["counts"].items()}
            nette = sampling[0]["extra_info"]["nette"]
            n = nette["steps"]
            g_l = nette["lgd_window"][1] - nette["lgd_window"][0] + 1
            g_i = nette["igd_window"][1] - nette["igd_window"][0] + 1
            per_cand = g_l * c["lgd_step"] + (n - g_l) * c["unguided_step"] + c["decode_and_score"]
            per_seed = g_i * c["igd_step"] + (n - g_i) * c["unguided_step"] + c["decode"]
            sample = ((stages - 1) * classes * 10 * 3 * per_cand + classes * 10 * per_seed) / 1e15
        fp32_h = (d + e + a) * 1e15 / (H100_FP32 * 0.5) / 3600
        lone = (d + e + a) * 1e15 / (H100_BF16 * TRAIN_UTIL_LONE) / 3600
        grouped_h = (d * 1e15 / (H100_BF16 * TRAIN_UTIL_LONE) + (e + a) * 1e15 / (H100_BF16 * TRAIN_UTIL_GROUP)) / 3600
        samp_h = sample * 1e15 / (H100_BF16 * UTILISATION) / 3600 if sample is not None else 0.0
        rows.append([ipc, fmt(sample, 3) if sample is not None else "", fmt(d, 3), fmt(e, 3), fmt(a, 3),
                     fmt(fp32_h + samp_h, 2), fmt(lone + samp_h, 2), fmt(grouped_h + samp_h, 2)])
    lines += table(["IPC", "sampling PFLOP", "distill training PFLOP", "evaluate PFLOP", "analyze PFLOP",
                    "H100 h: fp32 training", "H100 h: bf16, one at a time", "H100 h: bf16, groups"], rows)
    lines += ["", f"Utilisation assumed, not measured (no GPU run yet): sampling {UTILISATION:.0%} of the bf16 peak "
              f"(as above); the reference loop's fp32 training 50 % of the fp32 peak "
              f"({H100_FP32 / 1e12:.0f} TFLOP/s); the fast engine's bf16 training {TRAIN_UTIL_LONE:.0%} of the bf16 "
              f"peak for one model at a time (distill's trainings) and {TRAIN_UTIL_GROUP:.0%} for vmap groups "
              "(evaluate, analyze). Goal on paper: the whole IPC-50 run, evaluate included, within 1 H100-hour.", ""]
    return lines


KNOWN = {"mm", "guided_step", "guided_sampling", "guided_step_memory", "flop_count", "training", "training_flop_count",
         "memory_count"}
GPU_MEMORY_TITLE = "## GPU memory of one guided step at ImageNette scale"


def gpu_memory_section(benchmarks: list[dict]) -> list[str]:
    """bench_projection.py's meta-device count: peak memory and the candidate batch that fits."""
    found = by_kernel(benchmarks, "memory_count")
    if not found:
        return []
    info = found[0]["extra_info"]
    batch = str(info["nette"]["batch_size"])
    cards = list(info["cards"])
    header = ["step", "precision", "decoder checkpointing", "weights GiB", "peak GiB, batch 1",
              f"peak GiB, batch {batch}"] + [f"largest batch, {card}" for card in cards]
    rows = [[r["kind"].upper(), r["precision"], "on" if r["checkpoint_decoder"] else "off",
             fmt(r["weights_bytes"] / 2**30), fmt(r["per_batch"]["1"] / 2**30), fmt(r["per_batch"][batch] / 2**30)]
            + [r["fits"][card] for card in cards] for r in info["rows"]]
    return [GPU_MEMORY_TITLE, "",
            f"Counted, not measured: `benchmarks/bench_projection.py` runs one guided step (the nette preset: "
            f"{info['models']}, E={info['nette']['checkpoints']} surrogate checkpoints for IGD) on the meta device "
            "and records the high-water mark of live tensor storage (saved activations and the transients of "
            "forward and backward) plus the weights. bf16 stands for autocast: fp32 weights and their bf16 "
            "copies are counted, the norms autocast keeps in fp32 are not (a slight underestimate). The largest "
            f"batch leaves {info['headroom']:.0%} of the card free for the allocator and workspaces. The batch "
            "is in candidates (`sampling.batch_size`; LGD batches are whole groups of kappa). `sampling."
            "fp32_guidance` runs the guided steps in fp32: use the fp32 rows. Decoder checkpointing is "
            "`sampling.checkpoint_decoder` (one more decoder forward per guided step). Not yet checked on a GPU "
            "(`benchmarks/gpu_check.py` measures it by trying).", ""] + table(header, rows)


def other_section(benchmarks: list[dict]) -> list[str]:
    rest = [b for b in benchmarks if b.get("extra_info", {}).get("kernel") not in KNOWN]
    if not rest:
        return []
    lines = ["## Other benchmarks", ""]
    for name, group in grouped(rest).items():
        rows = [[b["name"], b["extra_info"].get("provider", ""), b["stats"]["rounds"], fmt(b["stats"]["min"] * 1e3),
                 fmt(b["stats"]["median"] * 1e3), fmt(b["stats"]["mean"] * 1e3)] for b in group]
        header = ["benchmark", "provider", "rounds", "min ms", "median ms", "mean ms"]
        lines += [f"### {name}", ""] + table(header, rows)
    return lines



def training_sections(paths: list[Path]) -> str:
    """Only the training sections (with this run's date and load), for --update."""
    runs, benchmarks = load(paths)
    tops = ceilings(benchmarks)
    info = [b["extra_info"] for b in benchmarks if b["extra_info"].get("kernel") == "training"]
    loads = sorted(i["load_1min"] for i in info if "load_1min" in i)
    lines = training_section(benchmarks, tops)
    if lines and loads:
        lines[1:1] = ["", f"Run {runs[0]['datetime']}, torch {info[0].get('torch', '?')}, "
                      f"{info[0].get('threads', '?')} threads; 1-minute load {loads[0]:.1f} .. {loads[-1]:.1f}; "
                      f"matmul ceiling {max(tops.values()) / 1e9:.0f} GFLOP/s in the same run." if tops else ""]
    return "\n".join(lines + training_projection(benchmarks)).rstrip() + "\n"


def update_sections(paths: list[Path]) -> str:
    """The sections a partial run of the benchmarks can refresh: training, and the GPU memory count."""
    _, benchmarks = load(paths)
    text = training_sections(paths) if by_kernel(benchmarks, "training") else ""
    memory = gpu_memory_section(benchmarks)
    return text + ("\n" if text and memory else "") + "\n".join(memory).rstrip() + ("\n" if memory else "")


def splice(existing: str, sections: str) -> str:
    """`existing` with each section that `sections` has (by its "## " title) replaced, put at the end."""
    titles = tuple(line for line in sections.splitlines() if line.startswith("## "))
    blocks = re.split(r"(?m)^(?=## )", existing)
    kept = [b for b in blocks if not b.startswith(titles)]
    return "".join(kept).rstrip() + "\n\n" + sections


def render(paths: list[Path]) -> str:
    runs, benchmarks = load(paths)
    tops = ceilings(benchmarks)
    lines = ["# Benchmarks", "",
             "Generated by `benchmarks/make_table.py` from pytest-benchmark JSON; do not edit by hand. Re-run:", "",
             "```", "python -m pytest benchmarks -q --benchmark-only --benchmark-json=bench.json",
             "python benchmarks/make_table.py bench.json", "```", ""]
    for section in (machine_section(runs, benchmarks), goals_section(benchmarks, tops), matmul_section(benchmarks),
                    step_section(benchmarks, tops), sampling_section(benchmarks), memory_section(benchmarks),
                    gpu_memory_section(benchmarks), profile_section(benchmarks), projection_section(benchmarks, tops),
                    training_section(benchmarks, tops), training_projection(benchmarks), other_section(benchmarks)):
        lines += section
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    parser.add_argument("--update", action="store_true",
                        help="replace only the sections this JSON refreshes in the existing output: training "
                             "(bench_training.py's rows, with bench_matmul.py's ceiling and bench_projection.py's "
                             "counts) and the GPU memory count (bench_projection.py)")
    args = parser.parse_args(argv)
    if args.update:
        args.out.write_text(splice(args.out.read_text(), update_sections(args.json)))
    else:
        args.out.write_text(render(args.json))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
