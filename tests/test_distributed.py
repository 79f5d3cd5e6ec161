"""Two real CPU processes (Accelerate, gloo): the distilled set does not depend on the process
count, and a killed 2-process run resumes to the same files."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lgd
from tests.helpers import files, tiny_overrides

DISTILL = str(Path(lgd.__file__).parent / "distill.py")
# One thread per process in every run: reductions then add in the same order whatever the
# process count, so the comparison can demand identical bytes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, out: Path, overrides: list[str]) -> list[str]:
    args = ["--config", "demo", "--out", str(out), "--no-progress", *overrides]
    if processes == 1:
        return [sys.executable, "-m", "lgd", "distill", *args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(free_port()), DISTILL, *args]


def run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def overrides(tiny_models):  # noqa: F811
    return tiny_overrides(tiny_models, threads=1, **{"stages.ipc": 4, "eval.baselines": ["dit"]})  # as OMP_NUM_THREADS


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("one") / "run"
    seconds = run(launch(1, out, overrides))
    print(f"\n1-process run: {seconds:.1f} s")
    return out


@pytest.mark.slow
def test_two_processes_make_the_same_set_as_one(one_process_run, overrides, tmp_path):
    out = tmp_path / "two"
    seconds = run(launch(2, out, overrides))
    print(f"\n2-process run: {seconds:.1f} s")
    one, two = files(one_process_run), files(out)
    assert sorted(one) == sorted(two)
    differing = [name for name in one if one[name] != two[name]]
    assert not differing, differing[:10]


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_files(one_process_run, overrides, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(launch(2, out, overrides), env={**ENV, "ACCELERATE_USE_CPU": "true"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while len(list((out / "records" / "02").glob("*.json"))) < 4 and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # every rank and the launcher at once
    process.wait()
    assert len(list((out / "records" / "02").glob("*.json"))) < 20, "the kill should land mid-stage"
    run(launch(2, out, overrides))
    assert files(out) == files(one_process_run)


@pytest.mark.slow
def test_killing_the_launcher_ends_its_workers(overrides, tmp_path):
    """SIGKILL to `accelerate launch` alone (not its process group), mid-run: the workers end too
    (torch's elastic agent takes them down), and the run directory's lock is free for the resume."""
    import psutil

    from lgd.rundir import RunDir

    out = tmp_path / "orphaned"
    process = subprocess.Popen(launch(2, out, overrides), env={**ENV, "ACCELERATE_USE_CPU": "true"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(list((out / "records" / "02").glob("*.json"))) < 2 and time.time() < deadline:  # mid-run
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) >= 2
        process.kill()
        process.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [w.pid for w in alive]
        assert not RunDir(out).busy()
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_refused_claim_stops_every_process(one_process_run, overrides, tmp_path):
    """The main process claims the folder alone; when it cannot (here a resume that changes
    what to make), the other ranks stop with its reason instead of waiting for it forever."""
    import shutil

    out = tmp_path / "refused"
    shutil.copytree(one_process_run, out)
    before = files(out)
    changed = [o for o in overrides if not o.startswith("stages.ipc=")] + ["stages.ipc=2"]
    result = subprocess.run(launch(2, out, changed), env={**ENV, "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("stages.ipc") >= 2, result.stderr[-3000:]  # both ranks name the refused field
    assert files(out) == before
