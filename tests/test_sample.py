"""The unguided sampling command: PNG tree, manifest, seeding, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lgd.__main__ import main
from tests.helpers import tiny_dit_file, tiny_vae_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_dit_file(root / "dit.safetensors"), tiny_vae_folder(root / "vae")


def sample(models, out, *extra):
    dit, vae = models
    return main(["sample", "--dit", str(dit), "--vae", str(vae), "--out", str(out), "--steps", "4", *extra])


def pixels(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_writes_imagefolder_tree_and_manifest(models, tmp_path):
    out = tmp_path / "s"
    assert sample(models, out, "--classes", "0", "2", "--per-class", "2") == 0
    images = pixels(out)
    assert sorted(images) == ["0000/00000.png", "0000/00001.png", "0002/00000.png", "0002/00001.png"]
    assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in images.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["class"] for r in manifest["images"]] == [0, 0, 2, 2]
    assert len({r["seed"] for r in manifest["images"]}) == 4
    assert manifest["settings"]["steps"] == 4


def test_seeded_and_batch_independent(models, tmp_path):
    args = ("--classes", "1", "--per-class", "3", "--seed", "7")
    sample(models, tmp_path / "a", *args, "--batch-size", "1")
    sample(models, tmp_path / "b", *args, "--batch-size", "3")
    sample(models, tmp_path / "c", "--classes", "1", "--per-class", "3", "--seed", "8")
    a, b, c = pixels(tmp_path / "a"), pixels(tmp_path / "b"), pixels(tmp_path / "c")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--classes", "5"), "outside the DiT's 3 classes"),
        (("--cfg-scale", "0.5"), "cfg_scale"),
        (("--steps", "1"), "steps"),
    ],
)
def test_bad_input_is_one_clear_message(models, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    dit, vae = models
    code = main(["sample", "--dit", str(dit), "--vae", str(vae), "--out", str(out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_missing_checkpoint_and_nonempty_out(models, tmp_path, capsys):
    _, vae = models
    assert main(["sample", "--dit", str(tmp_path / "nope.pt"), "--vae", str(vae), "--out", str(tmp_path / "o")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert sample(models, full) == 2
    assert "not empty" in capsys.readouterr().err


def test_out_of_memory_is_one_line_with_the_batch_to_use(models, tmp_path, capsys, monkeypatch):
    from lgd.diffusion.sampler import Sampler

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Sampler, "sample", out_of_memory)
    assert sample(models, tmp_path / "o", "--per-class", "4", "--batch-size", "8") != 0
    err = capsys.readouterr().err
    assert "out of memory on cpu sampling a batch of 8 images; rerun with --batch-size 4" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_kernel_mode_option(models, tmp_path, monkeypatch):
    from lgd.kernels import policy

    seen = []
    monkeypatch.setattr("lgd.sample._sample", lambda args: seen.append(policy.current_mode()))
    sample(models, tmp_path / "k", "--kernels", "torch")
    assert seen == ["torch"]
