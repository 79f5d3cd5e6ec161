"""Benchmark-wide set-up: offline hub, thread count, collection of bench_*.py, shared models.

    python -m pytest benchmarks -q --benchmark-only --benchmark-json=bench.json
    python benchmarks/make_table.py bench.json      # -> BENCHMARKS.md

Loaded only when benchmarks/ is on the command line: pyproject's testpaths is tests/, so a
plain `pytest` from the repo root never collects these files.
LGD_BENCH_THREADS (default 2) sets torch's intra-op threads.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LGD_BENCH_THREADS", "2")))


def pytest_collect_file(file_path, parent):
    # pytest's default file pattern is test_*.py; the benchmark modules are bench_*.py. Files
    # named on the command line are collected by pytest itself, so skip them here.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def scenarios():
    """scenarios(name) -> the Scenario `name` ("demo" or "dit-b2"), built once per session."""
    from _scenarios import BUILDERS

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = BUILDERS[name]()
        return built[name]

    return get
