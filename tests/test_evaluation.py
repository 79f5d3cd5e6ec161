"""Evaluation protocol, analyses and report on a tiny fake run directory (CPU, seconds)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lgd.__main__ import main
from lgd.classifiers import build_classifier
from lgd.config import TrainSection
from lgd.data import TensorImageDataset
from lgd.errors import ConfigError
from lgd.assessment import (
    analyze_run,
    cartography_regions,
    cartography_shares,
    cross_increment_matrix,
    data_cartography,
    evaluate_run,
    increment_ids,
    load_run_config,
    training_dynamics,
    write_report,
)
from lgd.assessment.grids import tile_size
from lgd.files import write_json
from lgd.rundir import SyntheticSet, load_synthetic
from lgd.runtime import machine
from tests.helpers import SET_CLASSES as CLASSES, SET_SIZE as SIZE, pattern, write_set


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    write_set(run, stages=2, per_stage=1)
    write_set(run / "baselines" / "dit", stages=2, per_stage=1, single_stage=True, seed=1)
    config = {
        "seed": 0,
        "device": "cpu",
        "data": {"name": "fashion_mnist_embedded", "image_size": SIZE},
        "stages": {"ipc": 2, "increment": 1, "initial": "dit"},
        "eval": {"networks": ["convnet3"], "runs": 2, "baselines": ["random", "dit", "igd"],
                 "recipe": {"recipe": "plain", "epochs": 1, "batch_size": 8},
                 "periodic_tests": 0},  # the tests of best-epoch reporting turn them on
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(run / "done.json", {"images": 20, "stages": 2})  # a finished run
    return run


def tiny_data(n_per_class=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    images = torch.stack([pattern(int(c), generator=g) for c in labels])
    return TensorImageDataset((images * 255).round().to(torch.uint8), labels, [str(c) for c in range(CLASSES)])


def tiny_factory(size=SIZE, classes=CLASSES):
    def make(seed):
        torch.manual_seed(seed)
        return build_classifier("convnet3", 1, classes, size, width=8)
    return make


# ------------------------------------------------------------------ protocol and report


def test_evaluate_run_end_to_end_with_injected_data(run_dir):
    config = load_run_config(run_dir)
    results = evaluate_run(run_dir, config, train_data=tiny_data(), test_data=tiny_data(seed=1),
                           model_overrides={"width": 8}, progress=False)
    cells = results["accuracy"]["convnet3"]
    assert list(cells) == ["random", "dit", "lgd"]  # igd is missing: skipped, said so
    assert "igd" in results["skipped"] and "not found" in results["skipped"]["igd"]
    for cell in cells.values():
        assert len(cell["runs"]) == 2 and 0 <= cell["mean"] <= 100 and cell["std"] >= 0
    assert results["sets"]["random"]["ipc"] == results["sets"]["lgd"]["ipc"] == 2
    on_disk = json.loads((run_dir / "eval" / "results.json").read_text())
    assert on_disk["accuracy"] == results["accuracy"]

    report = write_report(run_dir).read_text()
    assert "| Network | Random | DiT | LGD |" in report
    row = next(line for line in report.splitlines() if line.startswith("| ConvNet-3 |"))
    assert row.count("±") == 3
    assert "Not evaluated: IGD" in report
    # the table names the machine it was computed on: another CPU computes other last bits
    assert on_disk["machine"] == machine() and machine()["threads"] == torch.get_num_threads()
    assert f"Trained on {machine()['cpu']} ({machine()['cpu_capability']} kernels" in report

    # the sample grids: one per evaluated set and one of real images, one row per class
    assert results["grids"] == {n: f"samples_{n}.png" for n in ("random", "dit", "lgd", "real")}
    tile = tile_size(SIZE)
    for name in results["grids"].values():
        grid = np.asarray(Image.open(run_dir / "eval" / name))
        assert grid.shape == (CLASSES * tile, 6 * tile)
    lgd_images = load_synthetic(run_dir)
    first = lgd_images.images[lgd_images.labels == 0][0, 0]  # class 0's first LGD image opens row 0
    grid = torch.from_numpy(np.asarray(Image.open(run_dir / "eval" / "samples_lgd.png")).copy())
    factor = tile // SIZE
    enlarged = (first * 255).round().to(torch.uint8).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    assert torch.equal(grid[:tile, :tile], enlarged)
    assert "## Samples" in report and "![LGD](samples_lgd.png)" in report and "![Real](samples_real.png)" in report


def test_evaluate_is_deterministic(run_dir):
    config = load_run_config(run_dir)
    kwargs = dict(sets=["lgd"], runs=1, test_data=tiny_data(seed=1), model_overrides={"width": 8}, progress=False)
    a = evaluate_run(run_dir, config, **kwargs)["accuracy"]
    b = evaluate_run(run_dir, config, **kwargs)["accuracy"]
    assert a == b


def test_evaluate_command_on_the_embedded_dataset(run_dir, capsys):
    code = main(["evaluate", str(run_dir), "--runs", "1", "--sets", "lgd", "dit", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = (run_dir / "eval" / "report.md").read_text()
    assert "| Network | DiT | LGD |" in report and "| ConvNet-3 |" in report
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["test_images"] == 1000 and results["recipe"]["epochs"] == 1


def test_a_validation_run_is_scored_on_held_out_training_images_never_the_test_split(run_dir, monkeypatch):
    import lgd.data

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["evaluate_on"] = "validation"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    splits, load = [], lgd.data.load_dataset
    monkeypatch.setattr(lgd.data, "load_dataset", lambda name, split, *a, **k: splits.append(split) or load(name, split, *a, **k))
    code = main(["evaluate", str(run_dir), "--runs", "1", "--sets", "lgd", "random", "--device", "cpu"])
    assert code == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["test_images"] == 1000  # 100 per class held out of the 5,000 training images
    assert results["scored_on"] == "validation" and set(splits) == {"train"}
    report = (run_dir / "eval" / "report.md").read_text()
    assert "## Top-1 accuracy on the validation split (held-out training images) (%)" in report
    assert "1000 real validation images" in report


def test_commands_report_a_missing_run_dir_or_config(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_run_config(tmp_path)


def test_bad_arguments_are_config_errors(run_dir):
    config = load_run_config(run_dir)
    with pytest.raises(ConfigError, match="unknown classifier"):
        evaluate_run(run_dir, config, networks=["vgg"], test_data=tiny_data(), progress=False)
    with pytest.raises(ConfigError, match="runs"):
        evaluate_run(run_dir, config, runs=0, test_data=tiny_data(), progress=False)
    with pytest.raises(ConfigError, match="image set"):
        evaluate_run(run_dir, config, sets=["minimax"], test_data=tiny_data(), progress=False)


# ------------------------------------------------------------------ analyses


def test_increment_ids_use_stages_or_split_a_single_stage_set(run_dir):
    staged = load_synthetic(run_dir)
    assert increment_ids(staged, 1).tolist() == staged.increments.tolist()
    single = load_synthetic(run_dir / "baselines" / "dit")
    assert single.increments.unique().tolist() == [1]
    ids = increment_ids(single, 1)
    for c in range(CLASSES):
        assert sorted(ids[single.labels == c].tolist()) == [1, 2]


def test_cross_increment_matrix_shape_and_diagonal_semantics():
    # increment 2 = increment 1's images with labels rotated: a model trained on one
    # increment is right on its own images (diagonal) and wrong on the other's.
    data = tiny_data(n_per_class=2)
    images = data.images.float() / 255
    labels = torch.cat([data.labels, (data.labels + 1) % CLASSES])
    images = torch.cat([images, images])
    increments = torch.tensor([1] * len(data.labels) + [2] * len(data.labels))
    section = TrainSection(recipe="plain", epochs=15, lr=0.05, batch_size=10)
    result = cross_increment_matrix(images, labels, increments, tiny_factory(), section, progress=False)
    m = torch.tensor(result["matrix"])
    assert m.shape == (2, 2) and result["increments"] == [1, 2]
    assert m.diagonal().min() >= 90 and m[0, 1] <= 10 and m[1, 0] <= 10
    assert result["off_diagonal_mean"] == pytest.approx(float((m[0, 1] + m[1, 0]) / 2))


def test_cartography_regions_and_shares():
    confidence = torch.tensor([0.9, 0.9, 0.5, 0.1, 0.1])
    variability = torch.tensor([0.1, 0.3, 0.1, 0.1, 0.25])
    regions = cartography_regions(confidence, variability)
    assert regions == ["easy", "ambiguous", "ambiguous", "hard", "ambiguous"]
    shares = cartography_shares(regions)
    assert shares == pytest.approx({"easy": 0.2, "ambiguous": 0.6, "hard": 0.2})
    g = torch.Generator().manual_seed(0)
    random_shares = cartography_shares(cartography_regions(torch.rand(50, generator=g), 0.5 * torch.rand(50, generator=g)))
    assert sum(random_shares.values()) == pytest.approx(1.0)


def test_data_cartography_and_dynamics_on_a_tiny_set():
    data = tiny_data(n_per_class=2)
    images, labels = data.images.float() / 255, data.labels
    increments = torch.tensor([1, 2] * (len(labels) // 2))
    section = TrainSection(recipe="plain", epochs=3, batch_size=10)
    carto = data_cartography(images, labels, increments, tiny_factory(), section, progress=False)
    assert carto["epochs"] == 3 and len(carto["confidence"]) == len(labels)
    assert sum(carto["shares"].values()) == pytest.approx(1.0)
    for shares in carto["shares_per_increment"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    dyn = training_dynamics(images, labels, increments, tiny_factory(), section, (images, labels),
                            epochs_per_increment=2, progress=False)
    assert len(dyn["loss"]) == 4 and dyn["test_epochs"] == [1, 2, 3, 4]
    assert len(dyn["final_accuracy"]) == 2 and dyn["gains"] == [pytest.approx(dyn["final_accuracy"][1] - dyn["final_accuracy"][0])]


def test_analyze_run_writes_json_plots_and_report(run_dir):
    config = load_run_config(run_dir)
    result = analyze_run(run_dir, config, epochs=2, dynamics_epochs=1, test_data=tiny_data(seed=1),
                         model_overrides={"width": 8}, progress=False)
    assert set(result["sets"]) == {"lgd", "dit"} and "igd" in result["skipped"]
    for name in ("lgd", "dit"):
        r = result["sets"][name]
        assert len(r["cross_increment"]["matrix"]) == 2
        assert len(r["dynamics"]["final_accuracy"]) == 2
        assert sum(r["cartography"]["shares"].values()) == pytest.approx(1.0)
        for plot in (f"cross_increment_{name}.png", f"cartography_{name}.png"):
            assert (run_dir / "eval" / plot).read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "eval" / "dynamics.png").is_file()
    # a later partial analysis keeps the earlier results
    analyze_run(run_dir, config, sets=["lgd"], analyses=["cross"], epochs=1, model_overrides={"width": 8},
                progress=False)
    kept = json.loads((run_dir / "eval" / "analyses.json").read_text())
    assert "cartography" in kept["sets"]["lgd"] and "dynamics" in kept["sets"]["dit"]

    report = write_report(run_dir).read_text()
    for needle in ("Cross-increment", "off-diagonal", "Training dynamics", "Data cartography",
                   "![LGD cross-increment matrix](cross_increment_lgd.png)", "![training dynamics](dynamics.png)"):
        assert needle in report


def test_analyze_command(run_dir, capsys):
    code = main(["analyze", str(run_dir), "--sets", "lgd", "--analyses", "cross", "cartography", "--epochs", "1",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "Data cartography" in (run_dir / "eval" / "report.md").read_text()


def test_synthetic_set_helper_types():
    s = SyntheticSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 1, 1]))
    assert increment_ids(s, 1).tolist() == [1, 2, 1, 2]


# ------------------------------------------------------------------ resume, refusals, groups


def evaluate(run, config, **kw):
    return evaluate_run(run, config, train_data=tiny_data(), test_data=tiny_data(seed=1),
                        model_overrides={"width": 8}, progress=False, **kw)


def test_a_rerun_reuses_finished_trainings_and_retrains_stale_ones(run_dir, monkeypatch):
    config = load_run_config(run_dir)
    first = evaluate(run_dir, config)
    records = sorted((run_dir / "eval" / "trainings").glob("*.json"))
    assert len(records) == 6  # convnet3 x (random, dit, lgd) x 2 runs

    import lgd.assessment.accuracy as protocol

    trained = []
    real = protocol.train_classifiers
    monkeypatch.setattr(protocol, "train_classifiers", lambda members, *a, **k: (trained.extend(members), real(members, *a, **k))[1])
    records[0].unlink()  # as if killed before this training finished
    again = evaluate(run_dir, config)
    assert again["accuracy"] == first["accuracy"] and len(trained) == 1

    trained.clear()  # another recipe: every record is stale
    changed = load_run_config(run_dir, ["eval.recipe.epochs=2"])
    evaluate(run_dir, changed)
    assert len(trained) == 6


@pytest.mark.parametrize("stacking", ["loop", "vmap"])
def test_groups_give_the_one_at_a_time_table(run_dir, stacking):
    alone = evaluate(run_dir, load_run_config(run_dir))["accuracy"]
    grouped = load_run_config(run_dir, ["eval.recipe.group_size=4", f"eval.recipe.stacking={stacking}",
                                        "eval.recipe.epochs=1"])
    for path in (run_dir / "eval" / "trainings").glob("*.json"):
        path.unlink()
    together = evaluate(run_dir, grouped)["accuracy"]
    if stacking == "loop":
        assert together == alone
    else:  # vmap reorders floats; accuracies are counts of 30 test images, so equal or one image apart
        for net, cells in alone.items():
            for name, cell in cells.items():
                assert together[net][name]["runs"] == pytest.approx(cell["runs"], abs=100 / 30 + 1e-9)


def test_evaluate_refuses_an_unfinished_or_empty_run(run_dir, capsys):
    (run_dir / "done.json").unlink()
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 2
    assert "not a finished run" in capsys.readouterr().err and not (run_dir / "eval").exists()
    assert main(["analyze", str(run_dir), "--device", "cpu"]) == 2
    assert "--partial" in capsys.readouterr().err
    for path in (run_dir / "records").rglob("*.json"):
        path.unlink()
    assert main(["evaluate", str(run_dir), "--partial", "--device", "cpu"]) == 2
    assert "no finished image" in capsys.readouterr().err and not (run_dir / "eval").exists()


def test_evaluate_overrides_only_eval_fields(run_dir):
    assert load_run_config(run_dir, ["eval.recipe.engine=reference"]).eval.recipe.engine == "reference"
    with pytest.raises(ConfigError, match="only eval"):
        load_run_config(run_dir, ["stages.ipc=4"])


@pytest.mark.slow
def test_evaluate_killed_mid_way_then_rerun_matches_an_uninterrupted_one(run_dir, tmp_path):
    """SIGKILL once the first training is recorded, run the same command again: same results.json."""
    command = [sys.executable, "-m", "lgd", "evaluate", str(run_dir), "--runs", "3", "--device", "cpu",
               "eval.recipe.epochs=40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)
    uninterrupted = json.loads((run_dir / "eval" / "results.json").read_text())["accuracy"]
    for path in (run_dir / "eval").rglob("*.json"):
        path.unlink()

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainings = run_dir / "eval" / "trainings"
    deadline = time.time() + 300
    while time.time() < deadline and not (trainings.is_dir() and any(trainings.glob("*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = len(list(trainings.glob("*.json")))
    assert 1 <= killed_with < 9, "the kill should land mid-way"
    subprocess.run(command, check=True, env=env, capture_output=True)
    assert json.loads((run_dir / "eval" / "results.json").read_text())["accuracy"] == uninterrupted


def test_a_rerun_of_analyze_keeps_finished_analyses(run_dir, monkeypatch):
    config = load_run_config(run_dir)
    kwargs = dict(sets=["lgd"], epochs=1, dynamics_epochs=1, test_data=tiny_data(seed=1),
                  model_overrides={"width": 8}, progress=False)
    first = analyze_run(run_dir, config, **kwargs)["sets"]["lgd"]
    import lgd.assessment.redundancy as analyses

    calls = []
    for name in ("train_classifier", "train_classifiers"):
        real = getattr(analyses, name)
        monkeypatch.setattr(analyses, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    again = analyze_run(run_dir, config, **kwargs)["sets"]["lgd"]
    assert calls == [] and again == first
    analyze_run(run_dir, config, **{**kwargs, "epochs": 2})  # another recipe: computed again
    assert calls


def test_eval_overrides_may_follow_options(run_dir, capsys):
    code = main(["evaluate", str(run_dir), "--runs", "1", "--sets", "lgd", "--device", "cpu", "eval.recipe.epochs=2"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "eval" / "results.json").read_text())["recipe"]["epochs"] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(run_dir), "--device", "cpu", "--bogus"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------ published protocols


def test_best_epoch_is_the_max_of_the_recorded_periodic_tests(run_dir):
    """Both numbers per training: the last epoch's, and the best of the periodic test
    evaluations (every epochs // periodic_tests epochs), each named in the report."""
    config = load_run_config(run_dir, ["eval.recipe.epochs=6", "eval.periodic_tests=3"])
    results = evaluate_run(run_dir, config, sets=["lgd", "dit"], runs=2, test_data=tiny_data(seed=1),
                           model_overrides={"width": 8}, progress=False)
    assert results["protocol"] == {"reported": "last epoch", "periodic_tests": 3, "eval_every": 2,
                                   "test_view": "resize", "teacher": None}
    for name in ("lgd", "dit"):
        for r in range(2):
            record = json.loads((run_dir / "eval" / "trainings" / f"convnet3-{name}-run{r}.json").read_text())
            assert record["test_epochs"] == [2, 4, 6]
            assert record["best_accuracy"] == max(record["test_accuracy"])
            assert record["test_accuracy"][-1] == pytest.approx(record["accuracy"])  # the last test is the last epoch
        best = results["best_epoch_accuracy"]["convnet3"][name]
        assert best["runs"] == [json.loads((run_dir / "eval" / "trainings" / f"convnet3-{name}-run{r}.json")
                                           .read_text())["best_accuracy"] for r in range(2)]
        assert best["mean"] >= results["accuracy"]["convnet3"][name]["mean"] - 1e-9
    report = write_report(run_dir).read_text()
    assert "Best-epoch (test-selected, as in IGD/Minimax): the best of 3 test evaluations, one every 2 epochs" in report
    assert "Accuracy after the last epoch" in report and "test images resized to 16 px (Minimax/IDC)" in report

    none = evaluate_run(run_dir, load_run_config(run_dir, ["eval.periodic_tests=0"]), sets=["lgd"], runs=1,
                        test_data=tiny_data(seed=1), model_overrides={"width": 8}, progress=False)
    assert "best_epoch_accuracy" not in none and none["protocol"]["eval_every"] is None
    assert "Best-epoch" not in write_report(run_dir).read_text()


def test_test_view_resizes_or_crops_the_real_test_images(tmp_path):
    """resize: the test split loaded at the classifier size (Minimax/IDC); crop: loaded at
    data.image_size and centre-cropped. On an ImageNet-layout folder the two differ."""
    from PIL import Image

    from lgd.assessment.accuracy import center_crop, materialise
    from lgd.data import load_dataset

    root = tmp_path / "imagefolder"
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n02102040"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / "a.png")
    resized = materialise(load_dataset("imagefolder", "test", root, 16), crop=16, progress=False)[0]
    cropped = materialise(load_dataset("imagefolder", "test", root, 20), crop=16, progress=False)[0]
    assert resized.shape == cropped.shape == (2, 3, 16, 16)
    assert not torch.equal(resized, cropped)
    full = materialise(load_dataset("imagefolder", "test", root, 20), progress=False)[0]
    assert torch.equal(cropped, center_crop(full, 16))
    with pytest.raises(ConfigError, match="eval.test_view must be resize or crop"):
        load_run_config_from_dict(tmp_path, {"eval": {"test_view": "stretch"}})


def load_run_config_from_dict(tmp_path, data):
    from lgd.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_soft_label_evaluation_with_the_runs_reference_model_as_teacher(run_dir, capsys):
    """eval.recipe.recipe=soft_label trains every set against the teacher's soft labels; the
    default teacher is RUN/models/reference.safetensors, and the report names the protocol."""
    from lgd.checkpoints import save_classifier

    overrides = ["eval.recipe.recipe=soft_label", "eval.recipe.lr=0.001", "eval.recipe.weight_decay=0.01",
                 "eval.recipe.epochs=2", "eval.recipe.engine=reference", "eval.periodic_tests=2"]
    args = ["evaluate", str(run_dir), "--runs", "1", "--sets", "lgd", "dit", "--device", "cpu", *overrides]
    assert main(args) == 2
    assert "reference.safetensors not found" in capsys.readouterr().err
    spec = {"name": "convnet3", "in_channels": 1, "num_classes": CLASSES, "image_size": SIZE, "width": 8}
    torch.manual_seed(0)
    save_classifier(build_classifier(**spec), run_dir / "models" / "reference.safetensors", spec)
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["recipe"]["recipe"] == "soft_label" and results["protocol"]["teacher"] == "reference"
    record = json.loads((run_dir / "eval" / "trainings" / "convnet3-lgd-run0.json").read_text())
    assert record["teacher"]["source"] == "reference" and record["test_epochs"] == [1, 2]
    assert "soft labels from the teacher reference (RDED/SRe2L protocol)" in (run_dir / "eval" / "report.md").read_text()


def test_a_torchvision_resnet18_teacher_loads_and_reads_the_subset_classes(tmp_path):
    """A torchvision-format state dict (the keys and size of torchvision's resnet18) loads as a
    teacher; with 1000 outputs on an ImageNet subset it answers at the subset's classes."""
    from types import SimpleNamespace

    from lgd.classifiers.torchvision_resnet import (
        IMAGENET_MEAN, IMAGENET_STD, TorchvisionResNet18, load_torchvision_resnet18)
    from lgd.config import Config
    from lgd.errors import CheckpointError
    from lgd.assessment.accuracy import load_teacher

    torch.manual_seed(0)
    net = TorchvisionResNet18(3, 1000, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()  # torchvision's inputs
    state = {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}
    assert len(state) == 122 and sum(p.numel() for p in net.parameters()) == 11_689_512  # torchvision's resnet18
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_torchvision_resnet18(path)(x), net(x))
    config = Config()
    config.eval.teacher = str(path)
    nette = SimpleNamespace(num_classes=2, class_ids=["n01440764", "n02102040"])  # ImageNet 0 and 217
    teacher, info = load_teacher(tmp_path, config, nette, 2, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x)[:, [0, 217]])
    assert info["source"] == str(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth is not a readable torch state dict"):
        load_torchvision_resnet18(tmp_path / "junk.pth")


def test_evaluate_and_analyze_take_no_progress(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--runs", "1", "--sets", "lgd", "--device", "cpu", "--no-progress",
                 "eval.periodic_tests=0"]) == 0
    assert main(["analyze", str(run_dir), "--analyses", "cartography", "--epochs", "1", "--device", "cpu",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "evaluate:" not in err and "it/s" not in err and "model/s" not in err


@pytest.mark.parametrize("size, tile", [(8, 64), (28, 56), (32, 64), (64, 64), (96, 96), (224, 96)])
def test_grid_tiles_enlarge_small_images_and_shrink_large_ones(size, tile):
    from lgd.assessment.grids import class_grid

    images = torch.rand(7, 3, size, size)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 2])
    grid = class_grid(images, labels, per_class=3)
    assert tile_size(size) == tile and grid.shape == (3, 3 * tile, 3 * tile)
    assert (grid[:, :tile, 2 * tile:] == 1).all()  # class 0 has two images: its third tile is blank
    assert grid.min() >= 0 and grid.max() <= 1
