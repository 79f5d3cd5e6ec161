"""Outputs other tools read right: class folders by identity, classes.json, `lgd export`."""
from types import SimpleNamespace

import torch
import yaml

from lgd.__main__ import main
from lgd.data import IMAGEWOOF, WNID_NAMES
from lgd.files import read_json, write_json
from lgd.rundir import Finished, RunDir, load_synthetic, record_name
from tests.helpers import pattern


def sorted_folder_labels(root):
    """torchvision ImageFolder's rule (DD-Ranking reads folders the same way): classes are the
    sorted folder names, a class's label its position among them."""
    return {name: i for i, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir()))}


def woof_run(tmp_path):
    """A finished ImageWoof run, written as lgd distill writes one (two images per class)."""
    run = RunDir(tmp_path / "run")
    woof = SimpleNamespace(class_ids=list(IMAGEWOOF), classes=[WNID_NAMES.get(w, w) for w in IMAGEWOOF])
    run.path.mkdir(parents=True)
    run.use_class_folders(woof, dit_classes=list(range(10)))
    g = torch.Generator().manual_seed(0)
    run.write([Finished(1, c, k, pattern(c, generator=g).expand(3, -1, -1), torch.zeros(4, 2, 2),
                        {"stage": 1, "class": c, "slot": k}) for c in range(10) for k in range(2)])
    config = {"data": {"name": "imagewoof", "root": "/elsewhere/imagewoof", "image_size": 16},
              "stages": {"ipc": 2, "increment": 2}}
    (run.path / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(run.path / "done.json", {"images": 20, "stages": 1})
    return run.path


def test_class_folders_are_wordnet_ids_and_pair_with_a_sorted_real_layout(tmp_path):
    run = woof_run(tmp_path)
    assert list(IMAGEWOOF) != sorted(IMAGEWOOF)  # why numbered folders mislabel every class
    classes = read_json(run / "classes.json")
    assert [c["folder"] for c in classes] == [c["wnid"] for c in classes] == list(IMAGEWOOF)
    real = tmp_path / "imagewoof" / "val"
    for wnid in sorted(IMAGEWOOF):
        (real / wnid).mkdir(parents=True)
    synthetic, real_labels = sorted_folder_labels(run / "images"), sorted_folder_labels(real)
    assert synthetic == real_labels
    for c in range(10):
        record = read_json(run / record_name(1, c, 0))
        folder = record["file"].split("/")[1]
        assert folder == IMAGEWOOF[c]  # lgd's label c is the class of that folder, so both readers agree


def test_export_round_trips_as_other_evaluators_load_it(tmp_path, capsys):
    run = woof_run(tmp_path)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    images = torch.load(out / "images.pt", weights_only=True)
    labels = torch.load(out / "labels.pt", weights_only=True)
    expected = load_synthetic(run)
    assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and images.shape == (20, 3, 16, 16)
    by_folder = sorted_folder_labels(out / "imagefolder")
    classes = {c["folder"]: c for c in read_json(out / "classes.json")}
    assert sum(1 for _ in (out / "imagefolder").rglob("*.png")) == 20
    for folder in by_folder:
        assert classes[folder]["wnid"] == folder == IMAGEWOOF[classes[folder]["index"]]
    info = read_json(out / "export.json")
    assert info["set"] == "lgd" and info["range"] == "[0, 1]"

    normalized = tmp_path / "normalized"
    assert main(["export", str(run), "--out", str(normalized), "--normalized"]) == 0
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.load(normalized / "images.pt", weights_only=True) * std + mean, images)
    assert main(["export", str(run), "--out", str(out)]) == 2  # never over an earlier export
    assert "is not empty" in capsys.readouterr().err


def test_a_run_started_with_numbered_folders_keeps_them(tmp_path):
    """Runs written before class folders had names resume with the folders they have."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write([Finished(1, 3, 0, torch.zeros(1, 4, 4), torch.zeros(1), {"stage": 1, "class": 3, "slot": 0})])
    assert read_json(run / record_name(1, 3, 0))["file"] == "images/0003/01-00000.png"
    resumed = RunDir(run.path)
    resumed.use_class_folders(SimpleNamespace(classes=[f"class {i}" for i in range(10)]), list(range(10)))
    assert resumed.folders is None and not (run.path / "classes.json").exists()
    assert resumed.image(1, 4, 0) == "images/0004/01-00000.png"
