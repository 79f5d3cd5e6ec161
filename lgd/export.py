"""`lgd export`: a finished run's set in the formats other evaluators read.

    python -m lgd export runs/nette --out exports/nette            # the LGD set
    python -m lgd export runs/nette --set igd --out exports/igd    # a baseline set

OUT/images.pt    float32 [N, C, H, W] in [0, 1] (--normalized: the dataset's mean/std applied,
                 as the DC/DSA/MTT code keeps its synthetic images)
OUT/labels.pt    int64 [N], lgd's class index (classes.json says which class that is)
OUT/imagefolder/<class folder>/*.png   the PNGs, by class identity: for torchvision's ImageFolder
                 and DD-Ranking, which label classes by sorted folder name
OUT/classes.json, OUT/export.json      the classes, and what was exported from where

The tensors load with `torch.load(path, weights_only=True)`, the way those evaluators load
theirs (MTT: images_best.pt / labels_best.pt; rename if a script expects those names).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SETS = ("lgd", "dit", "igd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory written by `lgd distill`")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--set", default="lgd", choices=SETS, help="which set: the run's own or a baseline")
    parser.add_argument("--normalized", action="store_true",
                        help="store the images normalised with the dataset's mean/std (DC/DSA/MTT convention)")


def run(args: argparse.Namespace) -> Path:
    return export_set(args.run_dir, args.out, args.set, normalized=args.normalized)


def export_set(run: Path, out: Path, name: str = "lgd", normalized: bool = False) -> Path:
    import torch

    from lgd.assessment import check_finished, load_run_config
    from lgd.classifiers import input_statistics
    from lgd.errors import ConfigError
    from lgd.files import read_json, write_json
    from lgd.rundir import finished_records, load_synthetic

    run, out = Path(run), Path(out)
    config = load_run_config(run)
    check_finished(run, partial=False)
    root = run if name == "lgd" else run / "baselines" / name
    if not root.is_dir():
        raise ConfigError(f"{run} has no {name} set ({root} not found)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new --out")
    synthetic = load_synthetic(root)
    classes = read_json(run / "classes.json") if (run / "classes.json").is_file() else None

    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted export
    staging.mkdir(parents=True)
    images = synthetic.images
    mean, std = input_statistics(images.shape[1])
    if normalized:
        images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.save(images.contiguous(), staging / "images.pt")
    torch.save(synthetic.labels.long(), staging / "labels.pt")
    for record in finished_records(root):
        target = staging / "imagefolder" / Path(record["file"]).relative_to("images")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / record["file"], target)
    if classes is not None:
        write_json(staging / "classes.json", classes)
    write_json(staging / "export.json", {
        "run": str(run.resolve()), "set": name, "dataset": config.data.name, "images": len(synthetic),
        "shape": list(images.shape), "normalized": normalized, "mean": mean, "std": std,
        "range": "normalized" if normalized else "[0, 1]"})
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out
