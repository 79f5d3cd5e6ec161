"""benchmarks/gpu_check.py without a GPU: the whole dry run, its refusals, and the pieces that
must agree with the rest of the repository (the SD-VAE layout, make_table's projection counts,
the validated.json update, the batch search).

The dry run runs every section on the CPU at tiny shapes (Triton interpreted, torch.compile
eager), in a subprocess, as a person would start it."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
VALIDATED = ROOT / "kernels" / "validated.json"
SECTIONS = {"environment": "Environment", "kernels": "Kernels", "guided_steps": "Guided steps",
            "sampling": "Sampling", "training": "Training", "projection": "Projection"}


def run_script(*args: str, pythonpath: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (benchmarks/ on sys.path for its _measure and make_table imports)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        yield benchmark_module("gpu_check")


# ---------------------------------------------------------------------------------------------
# The dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_script("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


@pytest.mark.slow
def test_dry_run_runs_every_section(dry_run):
    report, _ = dry_run
    assert report["dry_run"] and report["recorded"] is None
    assert {name: s["status"] for name, s in report["sections"].items()} == {name: "ok" for name in SECTIONS}


@pytest.mark.slow
def test_dry_run_kernels_are_correct_under_the_interpreter(dry_run):
    result = dry_run[0]["sections"]["kernels"]["result"]
    rows = result["rows"]
    assert len(ok(rows)) == len(rows)
    for kernel in ("adaln_norm", "group_norm_silu", "learnability"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {r["dtype"] for r in mine} == {"fp32", "bf16"}, kernel
        assert all(r["all_correct"] and all(r["correct"].values()) for r in mine), mine
        assert result["verdicts"][kernel]["correct"] and not result["verdicts"][kernel]["passed"]  # never in a dry run
    grads = {"adaln_norm": "dscale", "group_norm_silu": "dweight", "learnability": "dS/dreference"}
    assert all(grads[r["kernel"]] in r["correct"] for r in rows)  # the backward is checked too
    assert "winners" in next(r for r in rows if r["kernel"] == "learnability")["correct"]


@pytest.mark.slow
def test_dry_run_guided_steps_sampling_training(dry_run):
    sections = dry_run[0]["sections"]
    guided = sections["guided_steps"]["result"]
    assert len(ok(guided["rows"])) == len(guided["rows"])
    for kind in ("lgd", "igd"):
        rows = [r for r in guided["rows"] if r["kind"] == kind]
        assert {r["variant"] for r in rows} >= {"eager fp32", "eager bf16", "compiled bf16, fused kernels"}
        assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert guided["memory_search"] and all(not s["measured"] and s["tries"] for s in guided["memory_search"])
    sampling = sections["sampling"]["result"]
    assert sampling["run"]["status"] == "ok" and sampling["run"]["images_per_s"] > 0
    assert all(sampling["cuda_graphs"][mode]["status"] == "ok" for mode in ("default", "reduce-overhead"))
    training = sections["training"]["result"]["rows"]
    assert len(ok(training)) == len(training)
    assert {(r["network"], r["precision"], r["members"]) for r in training} >= {
        (n, p, m) for n in ("convnet6", "resnet18") for p in ("fp32", "bf16") for m in (1, 4)}


@pytest.mark.slow
def test_dry_run_projection_and_markdown(dry_run):
    report, markdown = dry_run
    projection = report["sections"]["projection"]["result"]
    assert [r["ipc"] for r in projection["rows"]] == [10, 50]
    for row in projection["rows"]:
        assert row["total_h"] > 0 and row["training_h"]["alone"] > 0 and row["sampling_h"]["baselines"] > 0
    assert projection["rows"][1]["sampling_h"]["stages"] > 0  # IPC 10 has no LGD stage, so only its seed
    assert all(v["value"] is not None for v in projection["inputs"].values())
    for title in SECTIONS.values():
        assert f"## {title}" in markdown
    assert "Dry run" in markdown


def test_out_of_time_rows_are_recorded_as_skipped(tmp_path):
    proc = run_script("--dry-run", "--budget-s", "0", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert statuses == {**{name: "skipped: out of time" for name in SECTIONS}, "projection": "ok"}
    projection = report["sections"]["projection"]["result"]
    assert all(row["total_h"] is None for row in projection["rows"])  # nothing measured, nothing projected
    assert all(v["value"] is None and "not measured" in v["source"] for v in projection["inputs"].values())
    assert "**skipped: out of time**" in (tmp_path / "gpu_check.md").read_text()


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit status 2


def test_record_is_refused_in_a_dry_run():
    before = VALIDATED.read_bytes()
    proc = run_script("--dry-run", "--record", "--out", "/nonexistent/never-written")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--record" in proc.stderr
    assert VALIDATED.read_bytes() == before


@pytest.mark.parametrize("package,source,expected", [
    ("torch", "__version__ = '2.5.0'\n", "torch >= 2.6, this Python has torch 2.5.0"),
    ("triton", "raise ImportError('simulated: no triton here')\n", "needs triton"),
    ("lgd", "raise ImportError('simulated: lgd is not installed')\n", "pip install -e . --no-deps --no-build-isolation"),
])
def test_a_missing_requirement_is_one_line(tmp_path, package, source, expected):
    """A stand-in package first on the path: the script's own check meets it."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(source)
    proc = run_script("--dry-run", "--out", str(tmp_path / "out"), pythonpath=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_without_dry_run_is_one_line(tmp_path):
    proc = run_script("--out", str(tmp_path))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA is not available" in proc.stderr


def test_version_tuple(gpu_check):
    assert gpu_check.version_tuple("2.6.0+cu124") == (2, 6, 0)
    assert gpu_check.version_tuple("2.7.0a0+git1234") == (2, 7, 0)
    assert gpu_check.version_tuple("2.5.1") < gpu_check.MIN_TORCH <= gpu_check.version_tuple("2.6.0.dev20250101")


# ---------------------------------------------------------------------------------------------
# Agreement with the rest of the repository


def test_sd_vae_layout_matches_bench_projection(gpu_check):
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        assert gpu_check.SD_VAE == benchmark_module("bench_projection").SD_VAE


def make_table_row(make_table, ipc: int, counts: dict | None = None) -> list[str]:
    """The cells of make_table.training_projection's row for `ipc`, with every network at 1e15
    FLOP per training image (so its PFLOP columns are image-step counts) and step FLOP counts
    `counts` (so its sampling column counts the units given 1e15)."""
    records = [{"extra_info": {"kernel": "training_flop_count",
                               "flops_per_image": {n: 1e15 for n in ("convnet6", "resnet_ap10", "resnet18")}}}]
    if counts is not None:
        nette = {"steps": 50, "lgd_window": [10, 45], "igd_window": [30, 45]}
        records.append({"extra_info": {"kernel": "flop_count", "nette": nette,
                                       "counts": {k: {"total": v} for k, v in counts.items()}}})
    records = [importlib.import_module("records").from_benchmark(r) for r in records]  # make_table's records module
    line = next(line for line in make_table.training_projection(records).splitlines() if line.startswith(f"| {ipc} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_projection_counts_match_make_table(gpu_check):
    make_table = benchmark_module("make_table")
    config = gpu_check.nette_config()
    steps = gpu_check.training_image_steps(config, 50)
    cells = make_table_row(make_table, 50)
    assert cells[2] == make_table.fmt(sum(steps["distill"].values()), 3)
    assert cells[3] == make_table.fmt(sum(steps["evaluate"].values()), 3)
    assert cells[4] == make_table.fmt(sum(steps["analyze"].values()), 3)
    stages = gpu_check.sampling_counts(config, 50)["stages"]
    for unit in ("lgd_step", "igd_step", "unguided_step", "decode_and_score", "decode"):
        counts = {k: 1e15 if k == unit else 0.0 for k in stages}
        assert make_table_row(make_table, 50, counts)[1] == make_table.fmt(stages[unit], 3), unit


def test_projection_at_ipc_10_has_no_lgd_stage(gpu_check):
    config = gpu_check.nette_config()
    stages = gpu_check.sampling_counts(config, 10)["stages"]
    assert stages["lgd_step"] == stages["decode_and_score"] == 0 and stages["igd_step"] == 100 * 16
    # the surrogate trains, the reference model (needed only by LGD stages) does not
    assert gpu_check.training_image_steps(config, 10)["distill"] == {"convnet6": 50 * gpu_check.TRAIN_IMAGES}


# ---------------------------------------------------------------------------------------------
# Recording and the memory search, without a GPU


def test_record_replaces_this_capability_only(gpu_check, tmp_path):
    path = tmp_path / "validated.json"
    old = {"gpu": "old", "capability": "9.0", "torch": "2.6", "triton": "3.2", "speedup_min": 1.1, "date": "2025-01-01"}
    other = {**old, "capability": "8.0"}
    path.write_text(json.dumps({"about": "kept", "kernels": {"adaln_norm": [old, other], "learnability": [old],
                                                             "group_norm_silu": [old]}}))
    verdict = lambda passed, complete=True: {"complete": complete, "passed": passed, "speedup_min": 1.234567}
    results = {
        "environment": {"result": {"gpu": "NVIDIA H100", "capability": "9.0", "torch": "2.8", "triton": "3.4"}},
        "kernels": {"result": {"verdicts": {"adaln_norm": verdict(True), "learnability": verdict(False),
                                            "group_norm_silu": verdict(False, complete=False)}}},
    }
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.TINY, False, results=results)
    assert gpu_check.record_validated(ctx, path)["passed"] == ["adaln_norm"]
    data = json.loads(path.read_text())
    assert data["about"] == "kept"
    new = data["kernels"]["adaln_norm"]
    assert other in new and len(new) == 2
    assert next(e for e in new if e["capability"] == "9.0")["gpu"] == "NVIDIA H100"
    assert next(e for e in new if e["capability"] == "9.0")["speedup_min"] == 1.235
    assert "learnability" not in data["kernels"]  # checked completely on 9.0 and failed: no longer validated
    assert data["kernels"]["group_norm_silu"] == [old]  # not checked completely: left alone


@pytest.mark.parametrize("limit,start,tries,fitting,expected", [
    (100, 30, 10, 0, (99, 102, True)),  # doubling 30, 60, 120, then bisecting to one group of 3
    (10, 30, 10, 0, (9, 12, True)),  # halving 30, 15, 6, then bisecting
    (100, 30, 2, 0, (60, None, False)),  # out of tries
    (100, 30, 10, 99, (99, 102, True)),  # a batch known to fit: starts from 2 x 99
    (2000, 30, 10, 0, (960, None, True)),  # everything fits up to the cap
])
def test_largest_batch(gpu_check, limit, start, tries, fitting, expected):
    tried = []
    fits = lambda b: tried.append(b) or b <= limit
    found = gpu_check.largest_batch(fits, start, group=3, cap=960, tries=tries, fitting=fitting)
    assert (found["largest_fitting"], found["smallest_failing"], found["pinned"]) == expected
    assert [b for b, _ in found["tries"]] == tried and len(tried) <= tries and all(b % 3 == 0 for b in tried)


def test_largest_batch_stops_when_out_of_time(gpu_check):
    found = gpu_check.largest_batch(lambda b: True if b < 60 else None, 30, group=3, cap=960, tries=10)
    assert (found["largest_fitting"], found["stopped"], found["pinned"]) == (30, gpu_check.SKIPPED, False)


def test_first_call_halves_the_batch_until_it_fits(gpu_check):
    def make_run(batch: int):
        def run():
            if batch > 6:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run

    batch, _, seconds = gpu_check.first_call_fitting(make_run, 30, group=3, device=torch.device("cpu"))
    assert batch == 6 and seconds >= 0  # 30, 15, then 6: whole groups of kappa = 3
    with pytest.raises(ValueError):  # anything but an out-of-memory is not retried
        gpu_check.first_call_fitting(lambda b: lambda: int("x"), 30, group=3, device=torch.device("cpu"))
