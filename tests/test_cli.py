"""The command line: bad input ends in one clear message, exit code 2, and no output written."""
import pytest

from lgd.__main__ import main


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.ipc=9"], "multiple of stages.increment"),
        (["model.dit=/no/such/DiT-XL-2-256x256.pt"], "/no/such/DiT-XL-2-256x256.pt"),
        (["data.name=imagenette", "data.root=/no/such/imagenette"], "/no/such/imagenette"),
        (["sampling.cfg_scale=0"], "sampling.cfg_scale"),
    ],
)
def test_distill_rejects_bad_config_before_any_work(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["distill", "--config", "demo", "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_distill_rejects_class_count_mismatch(tmp_path, capsys):
    from tests.helpers import tiny_dit_file, tiny_vae_folder

    dit = tiny_dit_file(tmp_path / "dit.safetensors", num_classes=3)
    vae = tiny_vae_folder(tmp_path / "vae", image_channels=1)
    out = tmp_path / "run"
    code = main(["distill", "--config", "demo", "--out", str(out), f"model.dit={dit}", f"model.vae={vae}",
                 "data.image_size=8"])
    assert code == 2
    assert "the DiT has 3 classes and the dataset 10" in capsys.readouterr().err
    assert not list(out.glob("images/*"))


def test_evaluate_missing_run_directory(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, monkeypatch, capsys):
    """model.dit / model.vae (and lgd sample's --dit/--vae) take a hub id: found in the local
    Hugging Face cache it is used; not cached, the command stops in one line without a download."""
    import shutil

    from lgd.demo.models import demo_paths
    from lgd.models.loading import resolve_weights

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-vae" / "snapshots" / "0123abcd"
    shutil.copytree(demo_paths()["vae"], snapshot)
    (cache / "models--someone--tiny-vae" / "refs").mkdir()
    (cache / "models--someone--tiny-vae" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_weights("someone/tiny-vae", "model.vae") == str(snapshot)
    assert resolve_weights("demo", "--dit") == str(demo_paths()["dit"])

    out = tmp_path / "run"
    assert main(["distill", "--config", "demo", "--out", str(out), "model.dit=facebook/DiT-XL-2-256"]) == 2
    err = capsys.readouterr().err
    assert "model.dit=facebook/DiT-XL-2-256 is neither a local path nor in the local Hugging Face cache" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("command", ["distill", "evaluate", "analyze"])
def test_every_command_runs_as_a_script_and_its_help_shows_defaults(command):
    """`python lgd/<command>.py` (what `accelerate launch lgd/<command>.py` runs) is the command;
    help texts show the defaults."""
    import subprocess
    import sys
    from pathlib import Path

    import lgd

    script = Path(lgd.__file__).parent / f"{command}.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"usage: lgd {command}" in result.stdout and "--no-progress" in result.stdout
    if command == "analyze":
        assert "(default: 1)" in " ".join(result.stdout.split())  # --eval-every
