"""A battery of mistakes users make: each ends in one clear line and exit code 2, without a
traceback, and leaves nothing that blocks the corrected command (no --out folder for a
distillation that could not start, an untouched run directory for an evaluation)."""
import json
import shutil

import pytest
import yaml

from lgd.__main__ import main
from lgd.demo.models import demo_paths
from lgd.files import write_json
from lgd.resume import claim
from lgd.rundir import RunDir
from tests.helpers import SET_SIZE, tiny_dit_file, write_set

pytestmark = pytest.mark.usefixtures("one_thread")


def fill(text: str, inputs) -> str:
    """text with each {name} replaced by the path of that broken input."""
    for path in inputs.iterdir():
        text = text.replace("{" + path.name + "}", str(path))
    return text


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def inputs(tmp_path):
    """Broken inputs of every kind, by name."""
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "empty_root").mkdir()
    for split in ("train", "val"):
        (root / "no_images" / split / "n01440764").mkdir(parents=True)
    (root / "empty_vae").mkdir()
    (root / "dit.txt").write_text("not a checkpoint")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(demo_paths()["dit"].read_bytes()[:1000])
    broken_vae = root / "broken_vae"
    broken_vae.mkdir()
    (broken_vae / "config.json").write_text("{oops")
    (root / "list.yaml").write_text("- sampling\n- lgd\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "invalid.yaml").write_text("sampling: {steps: [\n")
    (root / "a_file").write_text("not a folder")
    return root


DISTILL = [
    (["stages.ipc=9"], "multiple of stages.increment"),
    (["lgd.stage_model.lr=abc"], "lgd.stage_model.lr must be float, got 'abc'"),
    (["lgd.lamm=3"], "did you mean lgd.lam?"),
    (["sampling.cfg_scale=1e9"], "sampling.cfg_scale must be in [1, 50], got 1000000000.0"),
    (["sampling.unguided_cfg_scale=0.5"], "sampling.unguided_cfg_scale must be in [1, 50] or null, got 0.5"),
    (["device=cuda:abc"], "device must be auto, cpu, cuda or cuda:N, got 'cuda:abc'"),
    (["device=tpu"], "device must be auto"),
    (["noequals"], "is not of the form section.key=value"),
    (["data.name=cifar"], "unknown dataset 'cifar'"),
    (["stages.increment=0", "lgd.kappa=0"], "stages.increment must be at least 1, got 0; lgd.kappa must be at least 1"),
    (["data.name=imagefolder", "data.root={empty_root}"], "does not exist"),
    (["data.name=imagenette", "data.root={no_images}"], "class folder(s) with no .JPEG/.jpg/.png images: n01440764"),
    (["model.dit=/no/such/file.pt"], "no such checkpoint file or folder: /no/such/file.pt"),
    (["model.dit={dit.txt}"], "as a DiT checkpoint"),
    (["model.dit={empty_vae}"], "is not a diffusers DiT folder"),
    (["model.dit={truncated.safetensors}"], "cannot read safetensors file"),
    (["model.vae={empty_vae}"], "no VAE at"),
    (["model.vae={broken_vae}"], "unreadable VAE config"),
    (["model.vae=/no/such/vae"], "VAE path does not exist"),
    (["model.dit=facebook/DiT-XL-2-256"], "in the local Hugging Face cache; lgd never downloads"),
    (["data.image_size=64"], "data.image_size 64 does not match the generator"),
    (["model.vae=identity", "data.image_size=8"], "the generator makes 4-channel images, the dataset has 1"),
]


@pytest.mark.parametrize("overrides, message", DISTILL)
def test_a_bad_distill_command_is_one_line_and_claims_nothing(inputs, tmp_path, capsys, overrides, message):
    overrides = [fill(o, inputs) for o in overrides]
    out = tmp_path / "run"
    assert main(["distill", "--config", "demo", "--out", str(out), *overrides]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("config, message", [
    ("nonsense", "neither a preset"),
    ("{list.yaml}", "must hold a mapping of sections"),
    ("{binary.yaml}", "is not a text file"),
    ("{invalid.yaml}", "is not valid YAML"),
])
def test_a_bad_config_file_is_one_line(inputs, tmp_path, capsys, config, message):
    out = tmp_path / "run"
    config = fill(config, inputs)
    assert main(["distill", "--config", config, "--out", str(out), "sampling.steps=10"]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_the_nette_preset_without_its_paths_names_both(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--config", "nette", "--out", str(out), "model.dit=demo"]) == 2
    line = error_line(capsys)
    assert "model.vae is required" in line and "data.root is required for imagenette" in line
    assert not out.exists()


def test_a_file_as_out_is_one_line(inputs, capsys):
    assert main(["distill", "--config", "demo", "--out", str(inputs / "a_file" / "run")]) == 2
    assert "cannot write to the run directory" in error_line(capsys)


def test_a_class_count_mismatch_is_one_line(tmp_path, capsys):
    dit = tiny_dit_file(tmp_path / "dit.safetensors", num_classes=3, input_size=8)
    out = tmp_path / "run"
    assert main(["distill", "--config", "demo", "--out", str(out), f"model.dit={dit}", "model.vae=identity",
                 "data.image_size=8"]) == 2
    assert "the DiT has 3 classes and the dataset 10" in error_line(capsys)
    assert not out.exists()


# --- run directories -----------------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    write_set(run, stages=2, per_stage=1)
    config = {"seed": 0, "device": "cpu", "data": {"name": "fashion_mnist_embedded", "image_size": SET_SIZE},
              "stages": {"ipc": 2, "increment": 1, "initial": "dit"},
              "eval": {"networks": ["convnet3"], "runs": 1, "baselines": ["random"], "periodic_tests": 0,
                       "recipe": {"recipe": "plain", "epochs": 1, "batch_size": 8}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(run / "done.json", {"images": 20, "stages": 2})
    return run


def contents(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    ("truncated_png", "cannot read"),
    ("broken_record", "is not a readable record"),
    ("no_done", "is not a finished run (no done.json)"),
    ("config_only", "is not a finished run"),
    ("no_config", "not found: "),
    ("locked", "is being written by a running lgd distill"),
])
def test_evaluate_on_a_damaged_or_unfinished_run_is_one_line_and_writes_nothing(finished_run, capsys, damage,
                                                                                 message):
    run = finished_run
    if damage == "truncated_png":
        png = run / "images" / "0003" / "02-00001.png"
        png.write_bytes(png.read_bytes()[:30])
    elif damage == "broken_record":
        (run / "records" / "01" / "0002-00000.json").write_text("{")
    elif damage == "no_done":
        (run / "done.json").unlink()
    elif damage == "config_only":
        for name in ("images", "records"):
            shutil.rmtree(run / name)
        (run / "done.json").unlink()
    elif damage == "no_config":
        (run / "config.yaml").unlink()
    holder = RunDir(run)
    if damage == "locked":
        holder.lock()
    before = contents(run)
    try:
        assert main(["evaluate", str(run), "--no-progress"]) == 2
    finally:
        holder.release()
    line = error_line(capsys)
    assert message in line
    if damage == "truncated_png":
        assert "images/0003/02-00001.png" in line
    assert contents(run) == before  # no eval/ written into the run


def test_evaluate_refuses_an_override_that_is_not_about_evaluation(finished_run, capsys):
    assert main(["evaluate", str(finished_run), "sampling.steps=3"]) == 2
    assert "only eval.* fields can be changed" in error_line(capsys)


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_a_missing_run_directory_is_one_line(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "missing")]) == 2
    assert "does not exist" in error_line(capsys)


def test_a_resume_with_a_changed_image_field_is_one_line(tmp_path, capsys):
    from lgd.config import load_config

    run = tmp_path / "run"
    claim(RunDir(run), load_config("demo"))
    stored = (run / "config.yaml").read_text()
    assert main(["distill", "--config", "demo", "--out", str(run), "lgd.lam=3"]) == 2
    assert "was started with a different config (lgd.lam)" in error_line(capsys)
    assert (run / "config.yaml").read_text() == stored


def test_lgd_sample_takes_the_demo_models_and_rejects_bad_counts(tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--dit", "demo", "--vae", "demo", "--out", str(out), "--per-class", "0"]) == 2
    assert "per-class" in error_line(capsys) and not out.exists()
    assert main(["sample", "--dit", "demo", "--vae", "demo", "--out", str(out), "--classes", "0",
                 "--steps", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["class"] for r in manifest["images"]] == [0]


def test_lgd_sample_removes_what_a_killed_sample_left(tmp_path):
    """A killed `lgd sample` leaves its staging folder next to --out; the next one removes it."""
    out = tmp_path / "samples"
    stale = tmp_path / ".samples.partial-abc123"
    (stale / "0000").mkdir(parents=True)
    assert main(["sample", "--dit", "demo", "--vae", "demo", "--out", str(out), "--classes", "1", "--steps", "2",
                 "--no-progress"]) == 0
    assert not stale.exists() and (out / "manifest.json").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=64"], "does not match the generator"),
    (["model.vae=identity", "data.image_size=8"], "the generator makes 4-channel images"),
    (["data.name=imagenette", "data.root={no_images}"], "class folder(s) with no"),
])
def test_a_misfit_is_found_from_the_headers_before_any_weights_load(inputs, tmp_path, capsys, monkeypatch,
                                                                    overrides, message):
    """The DiT's and VAE's shapes come from the safetensors header and config.json: a generator
    that does not fit the data is refused without reading the weights (gigabytes for DiT-XL/2)."""
    import lgd.candidates

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the inputs were checked")

    monkeypatch.setattr(lgd.candidates, "load_dit", no_weights)
    monkeypatch.setattr(lgd.candidates, "load_vae", no_weights)
    out = tmp_path / "run"
    assert main(["distill", "--config", "demo", "--out", str(out), *[fill(o, inputs) for o in overrides]]) == 2
    assert message in error_line(capsys)
    assert not out.exists()
