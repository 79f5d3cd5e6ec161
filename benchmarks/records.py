"""pytest-benchmark JSON -> flat records of one schema, the only input of the tables.

Every benchmark of bench_*.py becomes one Record: what ran (kernel, provider and the case's
config), where (device, threads, host, versions) and what was measured (seconds per call,
images per call, FLOPs, memory). The benchmarks' extra_info stays in `extra` for what a
section needs beyond these. Stdlib only: make_table.py runs without torch.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# extra_info keys that describe the machine or the build (_measure.environment), not the case
HOST = ("cpu", "cores", "cpu_mhz", "interop_threads", "load_1min", "learnability_op")
VERSIONS = ("torch", "diffusers")
# extra_info keys that hold measurements or counts, not the case
MEASURED = ("flops", "rss_peak", "alloc_peak", "first_call_s", "images_per_call", "profiled_cpu_ms", "top_ops",
            "counts", "flops_per_image", "rows")


@dataclass(frozen=True)
class Run:
    """One JSON file: when it ran, on which machine (pytest-benchmark's machine_info)."""
    file: str
    datetime: str | None
    version: str | None  # pytest-benchmark's
    machine: dict


@dataclass(frozen=True)
class Record:
    kernel: str | None  # which section reads it: mm, guided_step, training, ...
    provider: str | None  # fast, compiled, influence-free, reference, torch, cpp, meta, ...
    group: str  # the pytest-benchmark group, else the test's name: one table per group
    name: str
    config: dict  # the case: preset (extra_info's "config"), guidance path, batch, sizes, models
    size: int | None  # images per call
    device: str | None
    versions: dict  # python, pytest-benchmark, torch, diffusers (those recorded)
    threads: int | None
    host: dict  # cpu, cores, load_1min, ... at the start of the benchmark
    median: float | None  # seconds per call
    best: float | None  # the fastest round, the least disturbed on a shared machine
    mean: float | None
    rounds: int | None
    first_call: float | None  # seconds of a first call timed apart (it compiles)
    flops: dict  # FLOPs per call by part; {} where not counted
    memory: dict  # bytes: rss_peak (None where not exact), alloc_peak
    extra: dict  # the raw extra_info

    def ips(self, best: bool = False) -> float:
        """Images per second, from the median round or the best one."""
        return self.size / (self.best if best else self.median)


def from_benchmark(b: dict, run: Run | None = None) -> Record:
    """One entry of a pytest-benchmark JSON's "benchmarks" list (missing parts left empty)."""
    e = b.get("extra_info", {})
    stats = b.get("stats", {})
    versions = {k: e[k] for k in VERSIONS if k in e}
    if run is not None:
        versions = {"python": run.machine.get("python_version"), "pytest-benchmark": run.version, **versions}
    config = {k: v for k, v in e.items()
              if k not in HOST + VERSIONS + MEASURED + ("kernel", "provider", "device", "threads")}
    if "config" in config:
        config["preset"] = config.pop("config")
    return Record(
        kernel=e.get("kernel"), provider=e.get("provider"), group=b.get("group") or b.get("name", ""),
        name=b.get("name", ""), config=config, size=e.get("images_per_call", e.get("images")),
        device=e.get("device"), versions=versions, threads=e.get("threads"),
        host={k: e[k] for k in HOST if k in e}, median=stats.get("median"), best=stats.get("min"),
        mean=stats.get("mean"), rounds=stats.get("rounds"), first_call=e.get("first_call_s"), flops=e.get("flops", {}),
        memory={k: e[k] for k in ("rss_peak", "alloc_peak") if k in e}, extra=e)


def load(paths: list[Path]) -> tuple[list[Run], list[Record]]:
    runs, records = [], []
    for path in paths:
        data = json.loads(path.read_text())
        run = Run(str(path), data.get("datetime"), data.get("version"), data.get("machine_info", {}))
        runs.append(run)
        records += [from_benchmark(b, run) for b in data.get("benchmarks", [])]
    return runs, records


def by_kernel(records: list[Record], kernel: str) -> list[Record]:
    return [r for r in records if r.kernel == kernel]


def provider(group: list[Record], name: str) -> Record | None:
    return next((r for r in group if r.provider == name), None)


def grouped(records: list[Record]) -> dict[str, list[Record]]:
    """Records by group; the thread count joins the name when the records hold several."""
    mixed = len({r.threads for r in records}) > 1
    groups = defaultdict(list)
    for r in records:
        groups[f"{r.group} | {r.threads} thread(s)" if mixed else r.group].append(r)
    return groups
