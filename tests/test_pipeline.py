"""The distillation run end to end on tiny random models: layout, rank selection, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lgd.config import Config, load_config
from lgd.errors import ConfigError
from lgd.pipeline import Distiller
from lgd.resume import claim
from lgd.rundir import RunDir
from lgd.rundir import finished_records, load_synthetic
from tests.helpers import files, tiny_overrides


def test_run_layout_records_and_rank_selection(tiny_models, tmp_path):
    config = load_config("demo", tiny_overrides(tiny_models))
    run = Distiller(config, tmp_path / "run", progress=False).run_all()
    records = finished_records(run)
    assert len(records) == 10 * 4
    assert {r["stage"] for r in records} == {1, 2}
    for r in records:
        image = np.asarray(Image.open(run / r["file"]))
        assert image.shape == (8, 8) and image.dtype == np.uint8
        latent = load_file(str(run / f"latents/{r['stage']:02d}/{r['class']:04d}-{r['slot']:05d}.safetensors"))["latent"]
        assert latent.shape == (4, 4, 4) and torch.isfinite(latent).all()
        if r["stage"] == 2:  # learnability rank selection kept the top S of its kappa candidates
            assert len(r["candidate_S"]) == 2
            assert r["S"] == max(r["candidate_S"])
            assert r["S"] == pytest.approx(r["ce_student"] - config.lgd.omega * r["ce_reference"], abs=1e-5)
        else:
            assert r["kind"] == "igd"
    synthetic = load_synthetic(run)
    assert synthetic.images.shape == (40, 1, 8, 8) and synthetic.labels.bincount().tolist() == [4] * 10
    assert (run / "models/reference.safetensors").exists() and (run / "models/stage_02.safetensors").exists()
    assert len(finished_records(run / "baselines/dit")) == 40
    assert (run / "done.json").exists()


def test_each_round_sees_the_images_of_earlier_rounds(tiny_models, tmp_path):
    """With one slot per round, slot 1 of a class is deviation-guided away from slot 0 (the
    papers' memory); with both slots in one round, slot 1 sees no memory. Slot 0 is the same."""
    latents = {}
    for round_slots in (1, 2):
        overrides = tiny_overrides(tiny_models, **{"stages.ipc": 2, "eval.baselines": [], "igd.gamma": 5.0,
                                                   "sampling.round_slots": round_slots})
        run = Distiller(load_config("demo", overrides), tmp_path / str(round_slots), progress=False).run_all()
        latents[round_slots] = [load_file(str(run / f"latents/01/0003-0000{s}.safetensors"))["latent"] for s in (0, 1)]
    torch.testing.assert_close(latents[1][0], latents[2][0], rtol=0, atol=0)
    assert (latents[1][1] - latents[2][1]).abs().max() > 1e-3


def test_unguided_samples_take_their_own_cfg_scale(tiny_models, tmp_path):
    """sampling.unguided_cfg_scale reaches the DiT baseline and nothing guided: its DiT set is
    bit for bit a run's whose every set samples at that scale, its IGD set the run's at cfg_scale."""
    def latents(name, **extra):
        overrides = tiny_overrides(tiny_models, **{"stages.ipc": 2, **extra})
        run = Distiller(load_config("demo", overrides), tmp_path / name, progress=False).run_all()
        return {kind: torch.stack([load_file(str(p))["latent"] for p in sorted((run / folder).rglob("*.safetensors"))])
                for kind, folder in (("igd", "latents"), ("dit", "baselines/dit/latents"))}

    shared = latents("shared", **{"sampling.unguided_cfg_scale": None})  # cfg_scale 2 for both sets
    own = latents("own", **{"sampling.unguided_cfg_scale": 1.0})
    all_one = latents("all_one", **{"sampling.cfg_scale": 1.0})
    torch.testing.assert_close(own["dit"], all_one["dit"], rtol=0, atol=0)
    torch.testing.assert_close(own["igd"], shared["igd"], rtol=0, atol=0)
    assert (own["dit"] - shared["dit"]).abs().max() > 1e-3


def test_deviation_gamma_too_large_for_the_latents_is_warned(caplog):
    from lgd.pipeline import warn_deviation_scale

    with caplog.at_level("WARNING", logger="lgd.pipeline"):
        warn_deviation_scale(load_config("demo"), (4, 8, 8))  # the demo's scaled gammas: quiet
        warn_deviation_scale(Config(), (4, 32, 32))  # the papers' gammas on their latents
    assert not caplog.records
    with caplog.at_level("WARNING", logger="lgd.pipeline"):
        warn_deviation_scale(Config(), (4, 8, 8))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "lgd.gamma = 50 moves x_t by up to 20 %" in messages[0]
    assert "consider igd.gamma = 7.5" in messages[1]


def test_resume_fills_fields_added_since_the_run_started(tmp_path):
    """A run directory written before a config field existed resumes with that field's default;
    a real difference or a key this version does not know is refused with a clear message."""
    import yaml

    config = load_config("demo")
    claim(RunDir(tmp_path), config)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["sampling"]["precision"], stored["lgd"]["rho_scale"]  # as if written by an older lgd
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    claim(RunDir(tmp_path), config)  # no error
    with pytest.raises(ConfigError, match=r"different config \(stages.ipc\)"):
        claim(RunDir(tmp_path), load_config("demo", ["stages.ipc=20"]))
    stored["sampling"]["old_knob"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match="does not fit this version.*unknown config key.*sampling.old_knob"):
        claim(RunDir(tmp_path), config)


@pytest.mark.slow
def test_resumed_after_kill_equals_uninterrupted(tiny_models, tmp_path):
    """Kill the run (SIGKILL) in the middle of the LGD stage, rerun the command, compare."""
    overrides = tiny_overrides(tiny_models, **{"eval.baselines": []})
    command = [sys.executable, "-m", "lgd", "distill", "--config", "demo", "--no-progress"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run([*command, "--out", str(whole), *overrides], check=True, env=env, capture_output=True)

    process = subprocess.Popen([*command, "--out", str(broken), *overrides], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while len(list((broken / "records" / "02").glob("*.json"))) < 5 and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stage_two = len(list((broken / "records" / "02").glob("*.json")))
    assert 5 <= stage_two < 20, "the kill should land mid-stage"

    subprocess.run([*command, "--out", str(broken), *overrides], check=True, env=env, capture_output=True)
    assert files(broken) == files(whole)


def test_busy_or_changed_run_directory_is_refused(tiny_models, tmp_path):
    from lgd.errors import ConfigError

    run = tmp_path / "run"
    first = Distiller(load_config("demo", tiny_overrides(tiny_models, **{"eval.baselines": []})), run, progress=False)
    first.prepare()
    second = Distiller(load_config("demo", tiny_overrides(tiny_models, **{"stages.ipc": 6})), run, progress=False)
    with pytest.raises(ConfigError, match="in use by another lgd run"):
        second.prepare()  # the first still holds the run directory
    first.close()
    with pytest.raises(ConfigError, match="stages.ipc"):
        second.prepare()
    second.close()


def test_unwritable_run_directory_is_a_clear_error(tiny_models, tmp_path):
    from lgd.errors import LgdError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LgdError, match="cannot write to the run directory"):
        Distiller(load_config("demo", tiny_overrides(tiny_models)), blocker / "run", progress=False).run_all()


def test_compile_switch_reaches_the_influence_loss(tiny_models, tmp_path):
    """sampling.compile compiles IGD's influence gradient too (checked without running it: the
    compiled graphs themselves are tested in test_acceleration.py)."""
    for compile in (False, True):
        overrides = tiny_overrides(tiny_models, **{"sampling.compile": compile})
        distiller = Distiller(load_config("demo", overrides), tmp_path / str(compile), progress=False)
        try:
            distiller.prepare()
            assert distiller.influence_loss().compiled is compile
        finally:
            distiller.close()


def test_out_of_memory_is_one_line_and_resumes_with_a_smaller_batch(tiny_models, tmp_path, monkeypatch):
    """A batch that runs out of device memory ends the run with the batch size to use; the same
    command with that sampling.batch_size resumes it (the change goes to history.jsonl) and
    keeps every finished image."""
    from lgd.errors import LgdError

    from lgd.candidates import CandidateGenerator

    generate = CandidateGenerator._batch

    def small_memory(self, stage, jobs, *args):
        if stage == 2 and len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(self, stage, jobs, *args)

    monkeypatch.setattr(CandidateGenerator, "_batch", small_memory)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_models, **{"sampling.batch_size": 4, "eval.baselines": []})
    with pytest.raises(LgdError) as failure:
        Distiller(load_config("demo", overrides), run, progress=False).run_all()
    message = str(failure.value)
    assert "\n" not in message
    assert "out of memory on cpu sampling a batch of 4 candidates (sampling.batch_size=4)" in message
    assert "sampling.batch_size=2" in message
    seed_stage = files(run)
    assert len(finished_records(run)) == 10 * 2  # stage 1 finished before stage 2 ran out

    resumed = tiny_overrides(tiny_models, **{"sampling.batch_size": 2, "eval.baselines": []})
    Distiller(load_config("demo", resumed), run, progress=False).run_all()
    assert len(finished_records(run)) == 10 * 4
    for name, data in seed_stage.items():
        if name.startswith(("images/01", "latents/01", "records/01")):
            assert files(run)[name] == data, name
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"sampling.batch_size": [4, 2]}
    assert "batch_size: 2" in (run / "config.yaml").read_text()


def test_out_of_memory_with_one_group_per_batch_says_what_else_to_change():
    from lgd.candidates import out_of_memory_message

    message = out_of_memory_message(torch.device("cpu"), 3, 3, 3)
    assert "one group of 3 candidates (lgd.kappa=3)" in message and "sampling.batch_size=" not in message
    assert "sampling.batch_size=6" in out_of_memory_message(torch.device("cpu"), 12, 3, 12)


def test_reference_engine_runs_no_fused_kernel(tiny_models, tmp_path, monkeypatch):
    """The kernel mode of a run: the configured one for the fast engine, plain ops for the reference."""
    from lgd.kernels import policy

    seen = []
    monkeypatch.setattr(Distiller, "_run_stages", lambda self: seen.append(policy.current_mode()))
    for engine, kernels in (("fast", "fused"), ("reference", "fused"), ("fast", "auto")):
        overrides = tiny_overrides(tiny_models, **{"sampling.engine": engine, "sampling.kernels": kernels})
        Distiller(load_config("demo", overrides), tmp_path / engine, progress=False).run_all()
    assert seen == ["fused", "torch", "auto"]


@pytest.mark.slow
def test_a_resume_computes_with_the_thread_count_the_run_started_with(tiny_models, tmp_path, monkeypatch):
    """The first start records the intra-op thread count (environment.json). A resume under
    another count computes with the recorded one (logged in history.jsonl), so it ends
    byte-identical to an uninterrupted run; the process's own count is restored afterwards."""
    from lgd.candidates import CandidateGenerator
    from lgd.errors import LgdError

    overrides = tiny_overrides(tiny_models, threads=None, **{"eval.baselines": []})  # the process's count
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = Distiller(load_config("demo", overrides), tmp_path / "whole", progress=False).run_all()
        batch = CandidateGenerator._batch

        def interrupted(self, stage, jobs, *args):
            if stage == 2:
                raise LgdError("interrupted")
            return batch(self, stage, jobs, *args)

        monkeypatch.setattr(CandidateGenerator, "_batch", interrupted)
        run = tmp_path / "run"
        with pytest.raises(LgdError, match="interrupted"):
            Distiller(load_config("demo", overrides), run, progress=False).run_all()
        monkeypatch.setattr(CandidateGenerator, "_batch", batch)
        torch.set_num_threads(2)
        seen = []
        monkeypatch.setattr(Distiller, "lgd_stage", lambda self, *a, _stage=Distiller.lgd_stage:
                            seen.append(torch.get_num_threads()) or _stage(self, *a))
        Distiller(load_config("demo", overrides), run, progress=False).run_all()
        assert seen and set(seen) == {1}  # computed with the run's thread count
        assert torch.get_num_threads() == 2  # and gave the process its own back
        assert files(run) == files(whole)
        assert json.loads((run / "environment.json").read_text())["threads"] == 1
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert history[-1]["event"] == "environment" and history[-1]["changed"]["threads"] == [1, 2]
    finally:
        torch.set_num_threads(before)


def test_a_resume_removes_what_interrupted_writes_left(tmp_path):
    """A kill inside an atomic write leaves its hidden .<name>.<random>.tmp file; the next start
    on the folder (holding the lock) removes such files and nothing else."""
    run = RunDir(tmp_path / "run")
    (run / "models").mkdir(parents=True)
    left = [run / "models" / ".stage_02.safetensors.abc123.tmp", run / "images" / "0001" / ".01-00003.png.x.tmp"]
    left[1].parent.mkdir(parents=True)
    for path in left:
        path.write_bytes(b"partial")
    kept = run / "models" / "reference.safetensors"
    kept.write_bytes(b"finished")
    run.lock()
    try:
        run.remove_leftovers()
    finally:
        run.release()
    assert not any(path.exists() for path in left) and kept.read_bytes() == b"finished"


@pytest.mark.slow
def test_a_resume_repairs_damaged_files_bit_for_bit(tiny_models, tmp_path, caplog):
    """Records hold the checksums of their PNG and latent. A rerun over a truncated PNG, a
    missing latent, a broken record and truncated cached models (the surrogate and a stage
    model) recomputes what is damaged, with one warning each, and ends byte-identical."""
    import shutil

    overrides = tiny_overrides(tiny_models, **{"eval.baselines": []})
    whole = Distiller(load_config("demo", overrides), tmp_path / "whole", progress=False).run_all()
    record = json.loads((whole / "records" / "02" / "0003-00002.json").read_text())
    assert set(record["sha256"]) == {"png", "latent"}
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    png = run / record["file"]
    png.write_bytes(png.read_bytes()[:40])
    (run / "latents" / "01" / "0005-00001.safetensors").unlink()
    (run / "records" / "02" / "0007-00003.json").write_text("{not json")
    for name in ("surrogate", "stage_02"):
        model = run / "models" / f"{name}.safetensors"
        model.write_bytes(model.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        Distiller(load_config("demo", overrides), run, progress=False).run_all()
    assert files(run) == files(whole)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{record['file']} does not match its record's checksum" in m for m in warned)
    assert any("latents/01/0005-00001.safetensors is missing" in m for m in warned)
    assert any("0007-00003.json: the record is unreadable" in m for m in warned)
    assert sum("is damaged" in m and "trained again" in m for m in warned) == 2


def test_a_resume_may_change_how_to_compute_but_not_what_to_make(tmp_path):
    """Fields that say how to compute (batch size, device, compile, eval.*, a training section's
    engine switches) may change on a resume: config.yaml is rewritten and history.jsonl says
    what changed and which changes may alter the last bits; fields that define the images are
    refused, all of them named."""
    from lgd.errors import ConfigError

    run = RunDir(tmp_path)
    claim(run, load_config("demo"))
    how = ["sampling.batch_size=7", "device=cpu", "eval.runs=1", "sampling.compile=true",
           "lgd.stage_model.micro_batch=8"]
    claim(run, load_config("demo", how))
    entry = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert set(entry["changed"]) == {"sampling.batch_size", "device", "eval.runs", "sampling.compile",
                                     "lgd.stage_model.micro_batch"}
    assert entry["changed"]["device"] == ["auto", "cpu"]
    assert "eval.runs" not in entry["may_change_bits"] and "sampling.batch_size" in entry["may_change_bits"]
    assert load_config(tmp_path / "config.yaml").sampling.batch_size == 7
    with pytest.raises(ConfigError, match=r"different config \(lgd.lam, sampling.steps, sampling.unguided_cfg_scale\)"):
        claim(run, load_config("demo", how + ["lgd.lam=3", "sampling.steps=30", "sampling.unguided_cfg_scale=2"]))


@pytest.mark.slow
def test_a_run_keeps_a_log_its_training_histories_and_its_environment(tiny_models, tmp_path, caplog):
    overrides = tiny_overrides(tiny_models, **{"eval.baselines": []})
    caplog.set_level("INFO", logger="lgd")
    run = Distiller(load_config("demo", overrides), tmp_path / "run", progress=False).run_all()
    text = (run / "log.txt").read_text()
    for line in ("INFO lgd.pipeline: lgd ", "trained the reference classifier in", "run stage 2: 20 image(s) made in",
                 "40/40 images (100 %)"):
        assert line in text, line
    for name in ("reference", "stage_02", "surrogate"):
        history = json.loads((run / "models" / f"{name}.history.json").read_text())
        assert len(history["loss"]) == history["epochs"] == len(history["lr"]) >= 1
    environment = json.loads((run / "environment.json").read_text())
    assert environment["threads"] == torch.get_num_threads() and environment["torch"] == torch.__version__


def test_an_optional_tracker_gets_the_stage_rates_and_training_losses(tiny_models, tmp_path, monkeypatch):
    """tracker=tensorboard goes through Accelerate's TensorBoardTracker (faked here: neither
    tensorboard nor wandb is a dependency); without the package the config is refused in one line."""
    import accelerate.tracking

    from lgd import tracking
    from lgd.errors import ConfigError

    with pytest.raises(ConfigError, match="tracker=wandb needs the wandb package"):
        load_config("demo", ["tracker=wandb"])
    logged, stored = [], []

    class FakeTracker:
        def __init__(self, run_name, logging_dir):
            self.where = (run_name, logging_dir)

        def start(self):
            pass

        def store_init_configuration(self, values):
            stored.append(values)

        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            logged.append("finished")

    monkeypatch.setattr(tracking, "check_tracker", lambda kind: None)
    monkeypatch.setattr(accelerate.tracking, "TensorBoardTracker", FakeTracker)
    overrides = tiny_overrides(tiny_models, **{"eval.baselines": [], "tracker": "tensorboard"})
    Distiller(load_config("demo", overrides), tmp_path / "run", progress=False).run_all()
    assert stored[0]["lgd.lam"] == load_config("demo").lgd.lam
    keys = {key for entry in logged if entry != "finished" for key in entry[0]}
    assert {"sampling/run/images_per_s", "training/reference/loss", "training/stage_02/loss"} <= keys
    assert logged[-1] == "finished"


def test_a_validation_run_trains_without_the_held_out_images(tiny_models, tmp_path):
    from lgd.data import load_dataset
    from lgd.data.splits import split_validation

    overrides = tiny_overrides(tiny_models, **{"data.evaluate_on": "validation", "data.validation_per_class": 50})
    distiller = Distiller(load_config("demo", overrides), tmp_path / "run", progress=False)
    distiller.prepare()
    held = split_validation(load_dataset("demo", "train", image_size=8), 50)[1]
    assert len(distiller.train_set) == 4500
    trained_on = {bytes(x.numpy()) for x in distiller.train_set.images}
    assert not trained_on & {bytes(x.numpy()) for x in held.images}


def test_the_configs_thread_count_is_the_runs(tiny_models, tmp_path, monkeypatch):
    """threads: N computes distill, evaluate and analyze with N intra-op threads whatever the
    machine's core count (environment.json records it), and gives the process its count back."""
    import lgd.assessment

    before = torch.get_num_threads()
    overrides = tiny_overrides(tiny_models, threads=3, **{"stages.ipc": 2, "eval.baselines": [], "eval.processes": 1})
    seen = []
    run = Distiller(load_config("demo", overrides), tmp_path / "run", progress=False)
    run.prepare()
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["threads"] == 3
    assert torch.get_num_threads() == 3
    run.close()
    assert torch.get_num_threads() == before
    monkeypatch.setattr(lgd.assessment, "evaluate_run", lambda *a, **k: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(lgd.assessment, "check_finished", lambda *a: None)  # the run made no image
    from lgd.__main__ import main

    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert seen == [3] and torch.get_num_threads() == before
