"""The benchmark suites still run against the current code (CI does not time them).

Each demo-configuration case of the guided-step, guided-sampling and memory benchmarks runs
once with timing disabled, in a subprocess (benchmarks/ has its own conftest). The "compiled"
and "influence-free" cases would spend minutes compiling demo-size graphs; the compiled paths
they time are tested in test_acceleration.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_benchmarks_run():
    suites = [f"benchmarks/bench_{name}.py" for name in ("guided_step", "guided_sampling", "guided_memory")]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *suites, "-k", "demo and not compiled and not influence",
         "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "LGD_BENCH_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]
