"""Write BENCHMARKS.md from one or more pytest-benchmark JSON files.

    python benchmarks/make_table.py bench.json [more.json ...] [-o BENCHMARKS.md] [--update]

Sections: machine and versions; the goals; the fp32 matmul ceiling; per benchmark group a table
of images/s, the fast/reference ratio, FLOP/s and % of the ceiling; peak memory; the top ops of
the profiled fast steps; a projection of a full ImageNette run on one H100 from the FLOP counts.
Groups this script does not know get a plain timing table. records.py reads the JSON,
projection.py computes, render.py draws the tables, and the prose is
BENCHMARKS.template.md's: this file fills the template's blocks. No torch: it runs anywhere.
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import projection
from records import Record, Run, by_kernel, grouped, load, provider
from render import blocks, fill, fmt, records_table, table

MiB = 2**20
TEMPLATE = blocks(Path(__file__).with_name("BENCHMARKS.template.md").read_text())
GPU_MEMORY_TITLE = TEMPLATE["gpu_memory"].splitlines()[0]
KNOWN = {"mm", "guided_step", "guided_sampling", "guided_step_memory", "flop_count", "training", "training_flop_count",
         "memory_count"}
ORDER = {"fast": 0, "compiled": 1, "influence-free": 2, "reference": 3}


def by_provider(group: list[Record]) -> list[Record]:
    return sorted(group, key=lambda r: ORDER.get(r.provider, 3))


def vs_reference(r: Record, group: list[Record]) -> str:
    """images/s of a batched provider over the reference's, bold, or "" for the reference."""
    ref = provider(group, "reference")
    if r is ref or ref is None:
        return ""
    return f"**{r.ips() / ref.ips():.2f}x**"


def groups(block: str, records: list[Record], fields) -> str:
    """`block` filled once per group of `records`, with fields(name, group)."""
    return "\n\n".join(fill(TEMPLATE[block], **fields(name, group)) for name, group in grouped(records).items())


# ---------------------------------------------------------------------------------------------
# Sections: the text of one "## " section, or None where the records have nothing for it


def machine_section(runs: list[Run], records: list[Record]) -> str:
    m = runs[0].machine
    cpu = m.get("cpu", {})
    info = [r for r in records if "load_1min" in r.host]
    host, versions = (info[0].host, info[0].versions) if info else ({}, {})
    loads = [r.host["load_1min"] for r in info]
    hz = (cpu.get("hz_actual") or [0])[0]
    cores = host.get("cores") or cpu.get("count")
    return fill(TEMPLATE["machine"], cpu=host.get("cpu") or cpu.get("brand_raw", "?"), cores=cores,
                clock=f" at {hz / 1e9:.2f} GHz" if hz else "", system=m.get("system", ""),
                release=m.get("release", ""), peak=cores * hz * 32 / 1e9 if hz and cores else None,
                threads=" and ".join(str(t) for t in sorted({r.threads for r in info})) or "?",
                interop=host.get("interop_threads", "?"), op=host.get("learnability_op", "?"),
                python=m.get("python_version", "?"), torch=versions.get("torch", "?"),
                diffusers=versions.get("diffusers", "?"), pytest_benchmark=runs[0].version,
                runs=", ".join(f"{r.datetime} ({r.file})" for r in runs),
                load_min=min(loads) if loads else None, load_max=max(loads) if loads else None,
                load_median=statistics.median(loads) if loads else None)


def goals_section(records: list[Record], tops: dict[int, float]) -> str | None:
    goals = projection.goals(records, tops)
    if not goals:
        return None
    rows = [[g.what, g.threads, f"{100 * g.measured:.1f} %" if g.share else f"{g.measured:.2f}x",
             "yes" if g.met else "**no**"] for g in goals]
    items = [fill(TEMPLATE["goals.efficiency.item"], path=e.path.upper(), batch=e.batch, fast=e.per_image[0] / 1e9,
                  reference=e.per_image[1] / 1e9, fast_rate=e.rate[0] / 1e9, reference_rate=e.rate[1] / 1e9,
                  ceiling=f" ({100 * e.rate[0] / e.top:.0f} % of the matmul ceiling)" if e.top else "")
             for e in projection.demo_efficiency(records, tops)]
    efficiency = None
    if items:  # demo_efficiency's items come from the demo's step records
        dit = next(r.config["dit"] for r in by_kernel(records, "guided_step") if r.config.get("preset") == "demo")
        efficiency = fill(TEMPLATE["goals.efficiency"], items="\n".join(items), params=dit["params"] / 1e6)
    return fill(TEMPLATE["goals"], table=table(["goal", "threads", "measured", "met"], rows),
                bound=igd_bound(records, tops), efficiency=efficiency)


def igd_bound(records: list[Record], tops: dict[int, float]) -> str | None:
    """What compiled IGD would reach if its influence gradient cost nothing (provider influence-free),
    and the FLOP rate the influence gradient would need for the goal."""
    bounds = projection.igd_bound(records, tops)
    if not bounds:
        return None
    needs = [fill(TEMPLATE["goals.need"], scope=b.scope, have=b.have / 1e9, have_share=100 * b.have / b.top,
                  need=fill(TEMPLATE["goals.need.rate"], rate=b.need / 1e9, share=100 * b.need / b.top)
                  if b.need else TEMPLATE["goals.need.none"])
             for b in bounds if b.have is not None]
    cases = [fill(TEMPLATE["goals.bound.case"], ratio=b.ratio, scope=b.scope, batch=b.batch) for b in bounds]
    return fill(TEMPLATE["goals.bound"], cases=" and ".join(cases), goal=projection.GOALS["igd"],
                influence=projection.influence_flops(records) / 1e9 if needs else None, needs="; ".join(needs) or None)


def matmul_section(records: list[Record], tops: dict[int, float]) -> str | None:
    mm = sorted(by_kernel(records, "mm"), key=lambda r: (r.threads, r.config["n"]))
    if not mm:
        return None
    columns = [("threads", "threads"), ("n", lambda r: f"{r.config['n']}^2"), ("rounds", "rounds"),
               ("GFLOP/s (best)", lambda r: fmt(r.flops["total"] / r.best / 1e9)),
               ("GFLOP/s (median)", lambda r: fmt(r.flops["total"] / r.median / 1e9))]
    used = ", ".join(f"{t} thread(s): **{rate / 1e9:.1f} GFLOP/s**" for t, rate in sorted(tops.items()))
    return fill(TEMPLATE["matmul"], table=records_table(mm, columns), used=used)


def step_table(group: list[Record], tops: dict[int, float]) -> list[str]:
    def rate(r):
        return r.flops["total"] / r.best if r.flops.get("total") else None

    def ceiling(r):
        top = tops.get(r.threads)
        return f"{100 * rate(r) / top:.1f} %" if rate(r) and top else "-"

    columns = [("provider", "provider"), ("batch", "batch"), ("images/call", "images"),
               ("first call s", lambda r: fmt(r.first_call)), ("rounds", "rounds"),
               ("s/call (median)", lambda r: fmt(r.median)), ("images/s (median)", lambda r: fmt(r.ips())),
               ("images/s (best)", lambda r: fmt(r.ips(best=True))), ("x reference", lambda r: vs_reference(r, group)),
               ("GFLOP/image", lambda r: fmt(r.flops["total"] / r.size / 1e9) if r.flops.get("total") else "-"),
               ("GFLOP/s (best)", lambda r: fmt(rate(r) / 1e9) if rate(r) else "-"), ("% of ceiling", ceiling)]
    return records_table(by_provider(group), columns)


def step_section(records: list[Record], tops: dict[int, float]) -> str | None:
    steps = by_kernel(records, "guided_step")
    if not steps:
        return None

    def group_fields(name, group):
        c = group[0].config
        d = c["dit"]
        return dict(name=name, hidden=d["hidden"], depth=d["depth"], heads=d["heads"], patch=d["patch"],
                    tokens=d["tokens"], params=d["params"] / 1e6, latent="x".join(map(str, c["latent"])),
                    codec=c["codec"], classifiers=c["classifiers"], surrogate=c["surrogate"], weights=c["weights"],
                    table=step_table(group, tops))

    # compiled: counted on the eager fast call; influence-free: not counted; FLOPs do not depend
    # on the thread count
    counted = [r for r in steps if r.provider not in ("compiled", "influence-free")]
    parts = [("config", "preset"), ("guidance", lambda r: r.config["path"].upper()), ("provider", "provider")]
    parts += [(h, lambda r, k=k: fmt(r.flops[k] / r.size / 1e9))
              for h, k in (("total", "total"), ("DiT", "dit"), ("codec", "codec"), ("classifiers", "classifiers"),
                           ("other", "other"))]
    return fill(TEMPLATE["step"], groups=groups("step.group", steps, group_fields),
                parts=records_table(counted, parts, unique=("preset", "path", "provider")))


def sampling_section(records: list[Record]) -> str | None:
    runs = by_kernel(records, "guided_sampling")
    if not runs:
        return None

    def group_fields(name, group):
        c = group[0].config
        columns = [("provider", "provider"), ("batch", "batch"), ("images/call", "images"),
                   ("first call s", lambda r: fmt(r.first_call)), ("steps", "steps"), ("guided steps", "guided_steps"),
                   ("window", lambda r: f"{r.config['window'][0]}..{r.config['window'][1]}"),
                   ("s/call", lambda r: fmt(r.median)), ("images/s", lambda r: fmt(r.ips())),
                   ("x reference", lambda r: vs_reference(r, group))]
        return dict(name=name, share=c["guided_steps"] / c["steps"], steps=c["steps"], full_steps=c["full_steps"],
                    full_start=c["full_window"][0], full_end=c["full_window"][1], full_guided=c["full_guided_steps"],
                    full_share=c["full_guided_steps"] / c["full_steps"],
                    table=records_table(by_provider(group), columns))

    return fill(TEMPLATE["sampling"], groups=groups("sampling.group", runs, group_fields))


def memory_section(records: list[Record]) -> str | None:
    runs = by_kernel(records, "guided_step_memory")
    if not runs:
        return None
    rows = []
    for group in grouped(runs).values():
        for kind in ("lgd", "igd"):
            sub = [r for r in group if r.config["path"] == kind]
            fast, ref = provider(sub, "fast"), provider(sub, "reference")
            per = lambda r: r.memory["alloc_peak"] / r.size
            for r in sorted(sub, key=lambda r: r.provider):
                rss, alloc, images = r.memory.get("rss_peak"), r.memory["alloc_peak"], r.size
                ratio = per(fast) / per(ref) if r is fast and ref and per(ref) else None
                rows.append([r.config["preset"], kind.upper(), r.provider, r.threads, images,
                             fmt(rss / MiB) if rss is not None else "-",
                             fmt(rss / MiB / images) if rss is not None else "-",
                             fmt(alloc / MiB), fmt(alloc / MiB / images), f"{ratio:.2f}" if ratio else ""])
    header = ["config", "guidance", "provider", "threads", "images", "RSS peak MiB", "per image", "allocator peak MiB",
              "per image", "fast/ref per image (allocator)"]
    return fill(TEMPLATE["memory"], table=table(header, rows))


def gpu_memory_section(records: list[Record]) -> str | None:
    """bench_projection.py's meta-device count: peak memory and the candidate batch that fits."""
    found = by_kernel(records, "memory_count")
    if not found:
        return None
    info = found[0].extra
    batch = str(info["nette"]["batch_size"])
    cards = list(info["cards"])
    header = ["step", "precision", "decoder checkpointing", "weights GiB", "peak GiB, batch 1",
              f"peak GiB, batch {batch}"] + [f"largest batch, {card}" for card in cards]
    rows = [[r["kind"].upper(), r["precision"], "on" if r["checkpoint_decoder"] else "off",
             fmt(r["weights_bytes"] / 2**30), fmt(r["per_batch"]["1"] / 2**30), fmt(r["per_batch"][batch] / 2**30)]
            + [r["fits"][card] for card in cards] for r in info["rows"]]
    return fill(TEMPLATE["gpu_memory"], models=info["models"], checkpoints=info["nette"]["checkpoints"],
                headroom=info["headroom"], table=table(header, rows))


def profile_section(records: list[Record], count: int = 12) -> str | None:
    runs = [r for r in by_kernel(records, "guided_step_memory")
            if r.provider == "fast" and r.config["preset"] == "demo"]
    if not runs:
        return None
    columns = [("op", lambda o: o["op"]), ("self ms", lambda o: fmt(o["self_ms"])),
               ("share", lambda o: f"{100 * o['share']:.1f} %"), ("calls", lambda o: o["calls"])]
    return fill(TEMPLATE["profile"], runs="\n\n".join(
        fill(TEMPLATE["profile.run"], path=r.config["path"].upper(), batch=r.config["batch"], threads=r.threads,
             seconds=r.extra["profiled_cpu_ms"] / 1e3, table=records_table(r.extra["top_ops"][:count], columns))
        for r in runs))


def projection_section(records: list[Record], tops: dict[int, float]) -> str:
    counted = by_kernel(records, "flop_count")
    s = projection.sampling(counted[0].extra if counted else None)
    nette, rate, top = s.nette, projection.H100_BF16 * projection.UTILISATION, max(tops.values(), default=None)
    gflop = {k: getattr(s, k) / 1e9 for k in ("dit_forward", "unguided", "lgd_step", "igd_step", "final", "decode")}
    tflop = {k: getattr(s, k) / 1e12 for k in ("per_candidate", "per_seed")}
    shares = "" if s.shares is None else fill(TEMPLATE["projection.shares"],
                                              **dict(zip(("dit", "codec", "classifiers"), s.shares)))
    return fill(
        TEMPLATE["projection"], **gflop, **tflop,
        source=TEMPLATE["projection.counted" if s.counted else "projection.constants"],
        checkpoints=nette["checkpoints"], ipc=projection.IPC, increment=nette["increment"], stages=s.stages,
        lgd_stages=s.stages - 1, steps=s.steps, classes=nette["classes"], kappa=nette["kappa"],
        lgd_start=nette["lgd_window"][0], lgd_end=nette["lgd_window"][1], lgd_guided=s.lgd_guided,
        lgd_unguided=s.steps - s.lgd_guided, igd_start=nette["igd_window"][0], igd_end=nette["igd_window"][1],
        igd_guided=s.igd_guided, igd_unguided=s.steps - s.igd_guided, candidates=s.candidates,
        seed_images=s.seed_images, lgd_total=s.lgd_total / 1e15, igd_total=s.igd_total / 1e15, total=s.total / 1e15,
        peak=projection.H100_BF16 / 1e12, utilisation=projection.UTILISATION, rate=rate / 1e12,
        seconds=s.total / rate, minutes=s.total / rate / 60, at_25=s.minutes(utilisation=0.25),
        at_60=s.minutes(utilisation=0.6), fp32=s.minutes(projection.H100_FP32), tf32=s.minutes(projection.H100_TF32),
        shares=shares, baseline=projection.IPC // nette["increment"], ceiling=top / 1e9 if top else None,
        days=s.total / top / 86400 if top else None)


def training_section(records: list[Record], tops: dict[int, float], run: str | None = None) -> str | None:
    """`run`: a line on this run, put under the title (for --update)."""
    runs = by_kernel(records, "training")
    if not runs:
        return None
    top = max(tops.values()) if tops else None

    def group_fields(name, group):
        ref = provider(group, "reference")
        flops = lambda r: r.ips() * r.extra["flops_per_image"]
        columns = [("provider", "provider"), ("members", "members"), ("images/s", lambda r: fmt(r.ips())),
                   ("x reference", lambda r: fmt(r.ips() / ref.ips(), 2) + "x" if ref else ""),
                   ("GFLOP/s", lambda r: fmt(flops(r) / 1e9)),
                   ("% ceiling", lambda r: f"{flops(r) / top:.0%}" if top else ""),
                   ("first call s", lambda r: fmt(r.first_call, 2) if r.first_call is not None else "")]
        goal = dict(goal=None, best=None, ratio=None, verdict=None)  # no goal line
        if found := projection.training_goal(group):
            best, ratio, target = found
            goal = dict(goal=target, best=best.provider, ratio=ratio, verdict="met" if ratio >= target else "not met")
        c = group[0].config
        return dict(name=name, network=c["network"], width=c["width"], size=c["size"], channels=c["channels"],
                    images=c["images"], recipe=c["recipe"], epochs=c["epochs"],
                    mflop=group[0].extra["flops_per_image"] / 1e6, table=records_table(group, columns), **goal)

    return fill(TEMPLATE["training"], run=run, groups=groups("training.group", runs, group_fields))


def training_projection(records: list[Record]) -> str | None:
    """Whole nette run (IPC 50 and 100) on one H100: sampling (as above) plus every training."""
    counted = by_kernel(records, "training_flop_count")
    if not counted:
        return None
    f = counted[0].extra["flops_per_image"]
    sampling = by_kernel(records, "flop_count")
    rows = []
    for ipc in (50, 100):
        w = projection.whole_run(f, ipc, sampling[0].extra if sampling else None)
        rows.append([ipc, fmt(w.sampling, 3) if w.sampling is not None else "", fmt(w.distill, 3),
                     fmt(w.evaluate, 3), fmt(w.analyze, 3), fmt(w.fp32_h, 2), fmt(w.lone_h, 2), fmt(w.grouped_h, 2)])
    header = ["IPC", "sampling PFLOP", "distill training PFLOP", "evaluate PFLOP", "analyze PFLOP",
              "H100 h: fp32 training", "H100 h: bf16, one at a time", "H100 h: bf16, groups"]
    return fill(TEMPLATE["training_projection"], flops=", ".join(f"{k} {v / 1e9:.1f} GFLOP" for k, v in f.items()),
                table=table(header, rows), utilisation=projection.UTILISATION, fp32_peak=projection.H100_FP32 / 1e12,
                lone=projection.TRAIN_UTIL_LONE, group=projection.TRAIN_UTIL_GROUP)


def other_section(records: list[Record]) -> str | None:
    rest = [r for r in records if r.kernel not in KNOWN]
    if not rest:
        return None
    columns = [("benchmark", "name"), ("provider", lambda r: r.extra.get("provider", "")), ("rounds", "rounds"),
               ("min ms", lambda r: fmt(r.best * 1e3)), ("median ms", lambda r: fmt(r.median * 1e3)),
               ("mean ms", lambda r: fmt(r.mean * 1e3))]
    return fill(TEMPLATE["other"], groups=groups(
        "other.group", rest, lambda name, group: dict(name=name, table=records_table(group, columns))))


# ---------------------------------------------------------------------------------------------
# The document, and the partial update


def document(sections) -> str:
    return "\n\n".join(s for s in sections if s) + "\n"


def render(paths: list[Path]) -> str:
    runs, records = load(paths)
    tops = projection.ceilings(records)
    return document([TEMPLATE["head"], machine_section(runs, records), goals_section(records, tops),
                     matmul_section(records, tops), step_section(records, tops), sampling_section(records),
                     memory_section(records), gpu_memory_section(records), profile_section(records),
                     projection_section(records, tops), training_section(records, tops),
                     training_projection(records), other_section(records)])


def training_sections(runs: list[Run], records: list[Record]) -> list[str | None]:
    """Only the training sections, with a line on this run's date and load, for --update."""
    tops = projection.ceilings(records)
    info = by_kernel(records, "training")
    loads = sorted(r.host["load_1min"] for r in info if "load_1min" in r.host)
    run = None
    if loads and tops:
        first = info[0].extra
        run = fill(TEMPLATE["training.run"], datetime=runs[0].datetime, torch=first.get("torch", "?"),
                   threads=first.get("threads", "?"), load_min=loads[0], load_max=loads[-1],
                   ceiling=max(tops.values()) / 1e9)
    return [training_section(records, tops, run), training_projection(records)]


def update_sections(paths: list[Path]) -> str:
    """The sections a partial run of the benchmarks can refresh: training, and the GPU memory count."""
    runs, records = load(paths)
    sections = training_sections(runs, records) if by_kernel(records, "training") else []
    sections.append(gpu_memory_section(records))
    return document(sections) if any(sections) else ""


def splice(existing: str, sections: str) -> str:
    """`existing` with each section that `sections` has (by its "## " title) replaced where it
    stands; sections it did not have go at the end."""
    split = lambda text: [b.rstrip() + "\n" for b in re.split(r"(?m)^(?=## )", text) if b.strip()]
    title = lambda block: block.splitlines()[0]
    new = {title(b): b for b in split(sections) if b.startswith("## ")}
    old = split(existing)
    blocks = [new.pop(title(b), b) for b in old] + list(new.values())
    return "\n".join(blocks)


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
