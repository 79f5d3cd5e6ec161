"""Process plumbing (lgd.runtime).

The process-group timeout is the run's `distributed_timeout`: two real CPU processes (gloo)
whose main process works alone (as it does training theta* and IGD's surrogate) while the other
waits at a barrier. Within the timeout both pass; past it, the waiting rank stops with one line.

Run as a script (under `accelerate launch`), this file is the worker: TIMEOUT_MINUTES SLEEP_S.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
MAIN_WORK_S = 6.0  # the main process's lone work before the barrier


def launch(timeout_minutes: float) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), __file__, str(timeout_minutes), str(MAIN_WORK_S)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_wait_within_the_timeout_passes_and_one_beyond_it_stops_in_one_line():
    within = launch(timeout_minutes=1.0)
    assert within.returncode == 0, within.stderr[-3000:]
    assert within.stdout.count("past the barrier") == 2

    beyond = launch(timeout_minutes=0.05)  # 3 s, while the main process works for 6 s
    assert beyond.returncode != 0
    assert "waited more than distributed_timeout=0.05 minutes at a barrier" in beyond.stderr, beyond.stderr[-3000:]
    assert "past the barrier" not in beyond.stdout


def test_the_config_sets_the_runtime_timeout(tmp_path):
    from lgd.config import load_config
    from lgd.pipeline import Distiller

    distiller = Distiller(load_config("demo", ["distributed_timeout=42"]), tmp_path / "run", progress=False)
    assert distiller.runtime.timeout_minutes == 42


def test_accelerate_flags_lgd_does_not_use_are_warned_in_one_line_each(monkeypatch, caplog):
    from lgd.runtime import warn_ignored_launch_flags

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # accelerate's "off"
    with caplog.at_level("WARNING", logger="lgd.runtime"):
        warn_ignored_launch_flags()
    assert [r.getMessage() for r in caplog.records] == [
        "accelerate launch --mixed_precision=bf16 is ignored: lgd sets this with sampling.precision and each "
        "training section's precision in the config"]
    caplog.clear()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with caplog.at_level("WARNING", logger="lgd.runtime"):
        warn_ignored_launch_flags()
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["accelerate launch --dynamo_backend=INDUCTOR"]


def worker(timeout_minutes: float, work_s: float) -> int:
    from lgd.errors import LgdError
    from lgd.runtime import Runtime

    runtime = Runtime(timeout_minutes)
    try:
        if runtime.is_main:
            time.sleep(work_s)
        runtime.barrier()
        print(f"rank {runtime.rank} past the barrier", flush=True)
        runtime.shutdown()
        return 0
    except LgdError as exc:  # as `lgd`'s entry point reports it
        print(f"lgd: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(worker(float(sys.argv[1]), float(sys.argv[2])))
