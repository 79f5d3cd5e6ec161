"""The imagenet1k preset end to end on a tiny fake ImageNet folder and a tiny 1000-class DiT:
distill with the preset's layout and class mapping, then its soft-label evaluation with the
run's reference model as teacher (everything shrunk by overrides, the protocol kept)."""
import json

import torch
from PIL import Image

from lgd.__main__ import main
from lgd.config import load_config
from tests.helpers import tiny_dit_file, tiny_vae_folder

WNIDS = ["n01440764", "n02102040", "n03000684"]  # tench, springer, chain saw: ImageNet 0, 217, 491


def fake_imagenet(root, per_class: dict[str, int]) -> None:
    g = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = torch.rand(12, 10, 3, generator=g) * 0.3
                pixels[:, :, c] += 0.6  # the class is the dominant colour
                Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / f"{k}.png")


def test_the_preset_follows_the_soft_label_protocol():
    config = load_config("imagenet1k", ["model.dit=demo", "model.vae=demo", "data.root=."])
    e = config.eval
    assert (e.recipe.recipe, e.recipe.lr, e.recipe.weight_decay, e.recipe.temperature, e.recipe.epochs) == \
        ("soft_label", 0.001, 0.01, 20.0, 300)
    assert (e.networks, e.test_view, e.teacher, config.stages.ipc, config.stages.increment) == \
        (["resnet18_bn"], "crop", "reference", 50, 10)


def test_imagenet1k_preset_distils_and_evaluates_with_soft_labels(tmp_path, capsys):
    fake_imagenet(tmp_path / "imagenet", {"train": 6, "val": 2})
    dit = tiny_dit_file(tmp_path / "dit.safetensors", num_classes=1000)
    vae = tiny_vae_folder(tmp_path / "vae", image_channels=3)
    small = lambda epochs: json.dumps({"network": "convnet3", "width": 8, "recipe": "plain", "epochs": epochs,
                                       "batch_size": 16, "compile": False})
    run = tmp_path / "run"
    code = main(["distill", "--config", "imagenet1k", "--out", str(run), "--no-progress",
                 f"model.dit={dit}", f"model.vae={vae}", f"data.root={tmp_path / 'imagenet'}",
                 "data.image_size=8", "data.classifier_size=8", "sampling.steps=4", "sampling.batch_size=6",
                 "stages.ipc=2", "stages.increment=1", "lgd.kappa=2", "lgd.window=[0, 3]", "igd.window=[1, 3]",
                 "lgd.gamma=0.5", "igd.gamma=0.5", "igd.target_images=2", "igd.checkpoints=2",
                 "igd.cos_threshold=0.999", f"lgd.stage_model={small(1)}", f"lgd.reference_model={small(3)}",
                 f"igd.surrogate={small(2)}", "eval.baselines=[dit]"])
    assert code == 0, capsys.readouterr().err
    assert (run / "done.json").exists() and (run / "models" / "reference.safetensors").exists()
    code = main(["evaluate", str(run), "--runs", "1", "--device", "cpu", "eval.networks=[convnet3]",
                 "eval.recipe.network=convnet3", "eval.recipe.width=8", "eval.recipe.epochs=2",
                 "eval.recipe.batch_size=8", "eval.periodic_tests=2"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["recipe"]["recipe"] == "soft_label" and results["protocol"]["test_view"] == "crop"
    assert results["test_images"] == 6 and set(results["accuracy"]["convnet3"]) == {"lgd", "dit"}
    assert set(results["best_epoch_accuracy"]["convnet3"]) == {"lgd", "dit"}
    report = (run / "eval" / "report.md").read_text()
    assert "soft labels from the teacher reference (RDED/SRe2L protocol)" in report
