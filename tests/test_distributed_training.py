"""Distributed training on two real CPU processes (Accelerate, gloo): DDP of one classifier
(TrainSection.distributed) and `lgd evaluate` sharing its trainings among the processes.

Run as a script (under `accelerate launch`), this file is the DDP worker: it trains the tiny
classifier and saves each rank's weights and loss history for the test to compare.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lgd.classifiers import build_classifier
from lgd.config import TrainSection
from lgd.training import train_classifier

# One thread per process: a 1-process run then adds in the same order as each rank does.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
       "HF_HUB_OFFLINE": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CLASSES, SIZE = 5, 16
# 41 images in global batches of 8: the last batch has one image, so rank 1's share is empty.
SECTION = TrainSection(network="convnet3", recipe="hard_label", epochs=6, lr=0.05, batch_size=8, distributed=True)


def tiny_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a bright row band whose position is the class."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(41) % CLASSES
    images = 0.2 * torch.rand(len(labels), 1, SIZE, SIZE, generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 3 * c : 3 * c + 3] += 0.7
    return images, labels


def tiny_training(runtime=None) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = build_classifier("convnet3", 1, CLASSES, SIZE, width=8)
    history = train_classifier(model, tiny_set(), SECTION, seed=1, progress=False, runtime=runtime)
    return model, history.loss


def worker(out: Path) -> None:
    from lgd.runtime import Runtime

    runtime = Runtime()
    try:
        model, loss = tiny_training(runtime)
        torch.save({"state": model.state_dict(), "loss": loss, "world": runtime.world}, out / f"rank{runtime.rank}.pt")
        if runtime.is_main:
            # A backward through the trained model on one rank only (as IGD's guidance does with the
            # surrogate): no DDP gradient hook may still be waiting for the other rank.
            model(tiny_set()[0][:4]).sum().backward()
    finally:
        runtime.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*target: str) -> list[str]:
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(free_port()), *target]


def run(command: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.perf_counter() - start


@pytest.mark.slow
def test_ddp_training_keeps_ranks_equal_and_follows_the_one_process_recipe(tmp_path):
    seconds = run(accelerate_launch(__file__, str(tmp_path)))
    print(f"\n2-process DDP training: {seconds:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["loss"][-1] < 0.7 * ranks[0]["loss"][0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss = tiny_training()  # one process: no runtime, the flag is ignored
    finally:
        torch.set_num_threads(threads)
    # Same recipe, other float reduction order: close, not equal.
    torch.testing.assert_close(ranks[0]["loss"], loss, rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4, msg=key)


def fake_run(root: Path) -> Path:
    """A run directory with an LGD set and a DiT baseline (tests/test_evaluation.py's layout)."""
    from tests.helpers import write_set

    write_set(root, stages=2, per_stage=1)
    write_set(root / "baselines" / "dit", stages=2, per_stage=1, single_stage=True, seed=1)
    config = {"seed": 0, "device": "cpu", "data": {"name": "fashion_mnist_embedded", "image_size": 16},
              "stages": {"ipc": 2, "increment": 1, "initial": "dit"},
              "eval": {"networks": ["convnet3"], "runs": 1, "baselines": ["random", "dit"],
                       "recipe": {"recipe": "plain", "epochs": 2, "batch_size": 8}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "done.json").write_text("{}")  # a finished run
    return root


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [1, 2])
def test_evaluate_on_two_processes_gives_the_one_process_table(tmp_path, group_size):
    # random, dit, lgd x 1 run: three trainings, in groups of 1 (the second round leaves rank 1
    # idle) or of 2 (one group per rank: [random, dit] and [lgd]).
    args = ["evaluate", "--sets", "random", "dit", "lgd", "--device", "cpu", f"eval.recipe.group_size={group_size}"]
    one, two = fake_run(tmp_path / "one" / "run"), fake_run(tmp_path / "two" / "run")  # same name: same report
    seconds = run([sys.executable, "-m", "lgd", *args[:1], str(one), *args[1:]])
    print(f"\n1-process evaluate: {seconds:.1f} s")
    seconds = run(accelerate_launch("-m", "lgd", *args[:1], str(two), *args[1:]))
    print(f"2-process evaluate: {seconds:.1f} s")
    a, b = (json.loads((r / "eval" / "results.json").read_text()) for r in (one, two))
    assert sorted(a["accuracy"]["convnet3"]) == ["dit", "lgd", "random"]
    assert b == a
    assert (two / "eval" / "report.md").read_text() == (one / "eval" / "report.md").read_text()
    if group_size == 2:  # eval.processes: the same two processes, started by a plain `lgd evaluate`
        spawned = fake_run(tmp_path / "spawned" / "run")
        seconds = run([sys.executable, "-m", "lgd", *args[:1], str(spawned), *args[1:], "eval.processes=2"])
        print(f"eval.processes=2: {seconds:.1f} s")
        c = json.loads((spawned / "eval" / "results.json").read_text())
        assert c == a
        assert (spawned / "eval" / "report.md").read_text() == (one / "eval" / "report.md").read_text()


def test_eval_processes_end_in_one_line_on_bad_input(tmp_path, monkeypatch):
    """An error inside a spawned process is the command's one-line error; GPUs are refused."""
    import argparse

    from lgd.errors import ConfigError
    from lgd.evaluate import run as evaluate

    root = fake_run(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "lgd", "evaluate", str(root), "--runs", "0", "eval.processes=2"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "lgd evaluate: error: runs and epochs must be at least 1, got runs=0" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setattr("lgd.runtime.resolve_device", lambda name: torch.device("cuda"))
    args = argparse.Namespace(run_dir=root, overrides=["eval.processes=2"], partial=False, device=None)
    with pytest.raises(ConfigError, match="eval.processes=2 shares the trainings among CPU processes; on GPUs"):
        evaluate(args)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
