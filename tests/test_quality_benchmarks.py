"""The quality benchmarks (benchmarks/demo_ablation.py, benchmarks/fashion_mnist_quality.py)
run end to end on tiny models and data: each writes its table from the runs it made."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_overrides, write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks set these themselves; the tiny runs must not override them back.
THEIRS = ("stages.ipc", "eval.baselines")
TINY_EVAL = ["eval.recipe.epochs=1", "eval.recipe.width=8", "eval.recipe.compile=false", "eval.periodic_tests=0"]


def script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


@pytest.mark.slow
def test_fashion_mnist_quality_benchmark_on_a_tiny_configuration(tiny_models, tmp_path):
    root = write_fashion_mnist(tmp_path / "fmnist", train_per_class=12, test_per_class=3)
    tiny = [o for o in tiny_overrides(tiny_models) if not o.startswith(THEIRS)]
    script("fashion_mnist_quality.py", "--out", "out", "--ipc", "2", "--runs", "2", "--root", str(root),
           "--overrides", *tiny, *TINY_EVAL, "igd.target_images=2", tmp_path=tmp_path)
    rows = json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())
    assert [r["ipc"] for r in rows] == [2]
    (row,) = rows
    assert row["test_images"] == 30 and row["runs"] == 2  # the whole (tiny) test split
    assert set(row["accuracy"]) == {"random", "dit", "igd", "lgd"}
    assert all(len(cell["runs"]) == 2 for cell in row["accuracy"].values())
    table = (tmp_path / "out" / "fashion_mnist.md").read_text()
    lgd_mean = row["accuracy"]["lgd"]["mean"]
    assert f"| LGD (ours) | {lgd_mean:.1f} ± " in table and "| DSA " in table  # ours beside the published
    config = yaml.safe_load((tmp_path / "out" / "ipc2" / "config.yaml").read_text())
    assert config["data"]["name"] == "fashion_mnist" and config["eval"]["networks"] == ["convnet3"]
    assert row["guidance"] == {k: config["lgd"][k] for k in ("lam", "omega", "kappa")}
    assert row["distill_seconds"] > 0 and row["evaluate_seconds"] > 0
    # Run again: the finished run is reused and its row keeps the times it was measured with.
    script("fashion_mnist_quality.py", "--out", "out", "--ipc", "2", "--runs", "2", "--root", str(root),
           "--overrides", *tiny, *TINY_EVAL, "igd.target_images=2", tmp_path=tmp_path)
    assert json.loads((tmp_path / "out" / "fashion_mnist.json").read_text()) == rows


@pytest.mark.slow
def test_demo_ablation_on_a_tiny_configuration(tiny_models, tmp_path):
    values = {o.split("=", 1)[0]: json.loads(o.split("=", 1)[1]) for o in tiny_overrides(tiny_models)}
    preset = {"preset": "demo"}
    for key, value in {**values, "eval.baselines": ["random", "dit"],
                       "eval.recipe": {"network": "convnet3", "width": 8, "recipe": "plain", "epochs": 1,
                                       "compile": False},
                       "eval.runs": 2, "eval.periodic_tests": 0}.items():
        section, _, field = key.partition(".")
        preset.setdefault(section, {})[field] = value
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    variants = ("base", "lam 0", "dit cfg 2")
    script("demo_ablation.py", "--out", "out", "--preset", "tiny.yaml", "--only", *variants, tmp_path=tmp_path)
    rows = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == list(variants)
    base, lam0, dit_cfg = rows
    assert set(base) >= {"lgd", "random", "dit", "off_diagonal"} and set(lam0) >= {"lgd"} and "dit" not in lam0
    # The DiT-set variant is scored on the DiT set alone, sampled at its own CFG.
    assert dit_cfg["scored"] == "dit" and "dit" in dit_cfg and "lgd" not in dit_cfg
    for name in ("base", "lam_0", "dit_cfg_2"):
        config = yaml.safe_load((tmp_path / "out" / name / "config.yaml").read_text())
        assert config["data"]["evaluate_on"] == "validation"  # tuned on held-out training images
    assert yaml.safe_load((tmp_path / "out" / "lam_0" / "config.yaml").read_text())["lgd"]["lam"] == 0
    dit_config = yaml.safe_load((tmp_path / "out" / "dit_cfg_2" / "config.yaml").read_text())
    assert dit_config["sampling"]["unguided_cfg_scale"] == 2 and dit_config["eval"]["baselines"] == ["dit"]
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert f"| lam 0 | lgd.lam=0 | LGD {lam0['lgd']['mean']:.1f} ± " in table
    assert f"| dit cfg 2 | sampling.unguided_cfg_scale=2 | DiT {dit_cfg['dit']['mean']:.1f} ± " in table
    assert base["seconds"] > 0 and lam0["seconds"] > 0 and dit_cfg["seconds"] > 0
    # Run again: the runs are reused and their rows keep the seconds they were measured with.
    script("demo_ablation.py", "--out", "out", "--preset", "tiny.yaml", "--only", *variants, tmp_path=tmp_path)
    assert json.loads((tmp_path / "out" / "ablation.json").read_text()) == rows
