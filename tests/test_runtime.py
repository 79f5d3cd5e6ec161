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


def test_the_cpu_model_comes_from_cpuinfo_with_its_vendor_family_and_model(tmp_path, monkeypatch):
    """Virtual machines name their CPUs generically ("Intel(R) Xeon(R) Processor"), so the
    family and model numbers go with the name; without /proc/cpuinfo the platform's answer."""
    import builtins
    import platform

    from lgd import runtime

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC 9R14\n\nprocessor\t: 1\nmodel name\t: other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k))
    assert runtime.cpu_model() == "AMD EPYC 9R14 (AuthenticAMD family 25 model 17)"
    info.write_text("processor\t: 0\n")
    monkeypatch.setattr(platform, "processor", lambda: "x86_64-probe")
    assert runtime.cpu_model() == "x86_64-probe"


def test_a_resume_on_another_cpu_is_recorded_and_a_field_an_older_run_lacks_is_not(tmp_path, caplog):
    """environment.json holds the CPU: a resume on another one may change the last bits of the
    images still to be made, so it is kept in history.jsonl and warned; a run started before
    lgd recorded a field has no value for it, which is not a change."""
    import json

    from lgd.resume import pin_environment
    from lgd.rundir import RunDir

    run = RunDir(tmp_path)
    first = {"cpu": "AMD EPYC 9R14", "cpu_capability": "AVX512", "threads": 2, "torch": "2.13.0+cpu"}
    assert pin_environment(run, first) == first
    assert pin_environment(run, first) == first and not (tmp_path / "history.jsonl").exists()
    caplog.set_level("WARNING", logger="lgd")
    assert pin_environment(run, {**first, "cpu": "Intel(R) Xeon(R) Processor"}) == first
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"cpu": ["AMD EPYC 9R14", "Intel(R) Xeon(R) Processor"]}
    assert "different cpu" in caplog.text
    old = tmp_path / "old"
    old.mkdir()
    (old / "environment.json").write_text(json.dumps({"threads": 2, "torch": "2.13.0+cpu"}))
    pin_environment(RunDir(old), first)
    assert not (old / "history.jsonl").exists()


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

