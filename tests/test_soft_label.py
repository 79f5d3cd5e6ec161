"""The soft_label recipe (RDED / SRe2L evaluation protocol) on tiny CPU shapes: its loss, LR
schedule, optimizer groups, teacher handling, determinism and validation.

Run as a script (under `accelerate launch`), this file is the DDP worker of the slow
two-process test: it trains the tiny student and saves each rank's weights and losses.
"""
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lgd.classifiers import build_classifier
from lgd.config import TrainSection, _check_recipe, load_config
from lgd.errors import ConfigError
from lgd.training import cutmix, default_epochs, random_resized_crop, train_classifier
from lgd.training import trainer as trainer_module
from lgd.training.augment import soft_label_augment
from lgd.training.recipes import soft_label_loss
from lgd.training.trainer import Member, _loss_fn, recipe_optimizer, train_classifiers

CLASSES, SIZE = 5, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_set(n=40, seed=0, size=SIZE):
    """Noise plus a bright row band whose position is the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = 0.2 * torch.rand(n, 1, size, size, generator=g)
    band = size // CLASSES
    for i, c in enumerate(labels.tolist()):
        images[i, :, band * c : band * c + band] += 0.7
    return images.clamp(0, 1), labels


def net(seed=0):
    torch.manual_seed(seed)
    return build_classifier("convnet3", 1, CLASSES, SIZE, width=8)


def teacher_net():
    """A fixed random teacher with sharp logits (its classifier weights scaled up), so its
    argmax varies over the images and the student has something to fit."""
    teacher = net(seed=123)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20)
    return teacher


def section(**kw):
    base = dict(network="convnet3", recipe="soft_label", epochs=3, lr=0.01, weight_decay=0.01, batch_size=16,
                temperature=2.0)
    return TrainSection(**{**base, **kw})


def hand_kl(student_logits, teacher_logits, t):
    """sum_c p_t (log p_t - log p_s), averaged over the batch, at temperature t, no t^2."""
    p_t = torch.softmax(teacher_logits / t, 1)
    log_p_s = torch.log_softmax(student_logits / t, 1)
    return (p_t * (p_t.log() - log_p_s)).sum(1).mean()


# ------------------------------------------------------------------ loss


def test_loss_is_batchmean_kl_without_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(6, CLASSES, generator=g), 3 * torch.randn(6, CLASSES, generator=g)
    for temperature in (1.0, 4.0, 20.0):
        loss = soft_label_loss(s, t, temperature)
        expected = hand_kl(s, t, temperature)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        if temperature > 1:
            assert not torch.allclose(loss, expected * temperature**2)  # no T^2 factor
    assert float(soft_label_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)  # zero when the student is the teacher


def test_training_loss_is_the_kl_to_the_teacher_on_the_augmented_batch():
    """The loss of one training batch equals the hand KL of student and teacher on the same
    augmented images: RandomResizedCrop (scale 0.5-1) + flip, then CutMix, from the generator."""
    x, y = tiny_set(16)
    student, teacher = net(), teacher_net().eval()
    loss_fn = _loss_fn("soft_label", student, torch.Generator().manual_seed(5), teacher=teacher, temperature=3.0)
    loss = loss_fn(x, y)

    g = torch.Generator().manual_seed(5)
    cropped = random_resized_crop(x, SIZE, g, scale=(0.5, 1.0))
    mixed = cutmix(cropped, y, g)[0]
    torch.testing.assert_close(soft_label_augment(x, SIZE, torch.Generator().manual_seed(5)), mixed, rtol=0, atol=0)
    assert not torch.equal(mixed, x)
    with torch.no_grad():
        expected = hand_kl(student(mixed), teacher(mixed), 3.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert loss.requires_grad


# ------------------------------------------------------------------ schedule and optimizer


def test_lr_follows_rdeds_quarter_cosine():
    epochs, lr = 4, 0.01
    history = train_classifier(net(), tiny_set(16), section(epochs=epochs, lr=lr), teacher=teacher_net(),
                               progress=False)
    expected = [lr * 0.5 * (1 + math.cos(math.pi * e / epochs / 2)) for e in range(epochs)]
    assert history.lr == pytest.approx(expected, rel=1e-12)
    assert history.lr[0] == lr and history.lr[-1] > 0.5 * lr  # a quarter cosine: never below half
    assert default_epochs("soft_label", 10) == default_epochs("soft_label", 100) == 300


def test_adamw_decays_only_parameters_of_dim_above_one():
    model = net()
    optimizer, scheduler = recipe_optimizer(section(lr=0.001, weight_decay=0.05), model, epochs=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    by_decay = {}
    for group in optimizer.param_groups:
        assert group["lr"] == 0.001 and group["betas"] == (0.9, 0.999)
        by_decay.setdefault(group["weight_decay"], set()).update(id(p) for p in group["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[i] for i in by_decay[0.05]}
    free = {names[i] for i in by_decay[0.0]}
    assert set(by_decay) == {0.05, 0.0}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() > 1}
    assert free == {n for n, p in model.named_parameters() if p.dim() <= 1}
    assert any(n.endswith("bias") for n in free) and "features.1.weight" in free  # biases and GroupNorm weights
    assert "classifier.weight" in decayed and "features.0.weight" in decayed


def test_training_uses_that_optimizer(monkeypatch):
    seen = []
    real = trainer_module.recipe_optimizer

    def spy(section, model, epochs):
        optimizer, scheduler = real(section, model, epochs)
        seen.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(trainer_module, "recipe_optimizer", spy)
    train_classifier(net(), tiny_set(16), section(epochs=1), teacher=teacher_net(), progress=False)
    assert len(seen) == 1 and isinstance(seen[0], torch.optim.AdamW)
    assert seen[0].state  # it stepped


# ------------------------------------------------------------------ training


def _agreement(student, teacher, held):
    with torch.no_grad():
        s, t = student.eval()(held), teacher.eval()(held)
    kl = float(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"))
    return kl, float((s.argmax(1) == t.argmax(1)).float().mean())


def test_student_learns_to_agree_with_the_teacher():
    student, teacher = net(), teacher_net()
    held = tiny_set(40, seed=7)[0]
    kl0, agree0 = _agreement(student, teacher, held)
    history = train_classifier(student, tiny_set(40), section(epochs=10, temperature=1.0), teacher=teacher,
                               progress=False)
    kl, agree = _agreement(student, teacher, held)
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert kl < 0.5 * kl0
    assert agree > agree0 and agree >= 0.6


def test_same_seed_same_weights_other_seed_other_weights():
    data, teacher = tiny_set(24), teacher_net()

    def trained(seed, **kw):
        model = net()
        history = train_classifier(model, data, section(**kw), teacher=teacher, seed=seed, progress=False)
        return model.state_dict(), history.loss

    (a, loss_a), (b, loss_b), (c, _) = trained(1), trained(1), trained(2)
    assert loss_a == loss_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # The engine setting does not matter: soft_label always runs the reference loop.
    d, loss_d = trained(1, engine="reference")
    assert loss_d == loss_a and all(torch.equal(a[k], d[k]) for k in a)


def test_teacher_is_left_untouched_and_sees_what_the_student_sees(caplog, monkeypatch):
    teacher = teacher_net().train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []
    teacher.register_forward_hook(lambda m, args, out: calls.append(
        (m.training, torch.is_grad_enabled(), tuple(args[0].shape), float(args[0].min()), float(args[0].max()))))
    monkeypatch.setattr(trainer_module, "_SOFT_LABEL_NOTED", False)
    data = tiny_set(20, size=20)  # 20 px images for a 16 px classifier: both see 16 px
    with caplog.at_level(logging.INFO, logger="lgd.training.trainer"):
        members = [Member(net(), data, seed) for seed in (0, 1)]
        train_classifiers(members, section(epochs=2), teacher=teacher, progress=False)
    notes = [r for r in caplog.records if "reference loop" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # once, for both members
    assert teacher.training  # mode restored
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(calls) == 2 * 2 * 2  # members x epochs x batches (20 images, batch 16)
    for training, grad, shape, lo, hi in calls:
        assert not training and not grad
        assert shape[1:] == (1, SIZE, SIZE)
        assert 0 <= lo and hi <= 1


# ------------------------------------------------------------------ validation


def test_config_validation():
    _check_recipe(section(), "eval.recipe")  # a good one passes
    with pytest.raises(ConfigError, match="temperature must be positive"):
        _check_recipe(section(temperature=0.0), "eval.recipe")
    with pytest.raises(ConfigError, match="temperature must be positive"):
        _check_recipe(section(temperature=-1.0), "eval.recipe")
    with pytest.raises(ConfigError, match="soft_label.*compile=false"):
        _check_recipe(section(compile=True), "eval.recipe")
    with pytest.raises(ConfigError, match="soft_label"):
        _check_recipe(section(precision="bf16"), "eval.recipe")
    with pytest.raises(ConfigError, match="recipe must be"):
        _check_recipe(section(recipe="soft"), "eval.recipe")
    config = load_config("demo", ["eval.recipe.recipe=soft_label", "eval.recipe.compile=false",
                                  "eval.recipe.temperature=4"])
    assert config.eval.recipe.temperature == 4.0 and TrainSection().temperature == 20.0
    with pytest.raises(ConfigError, match="eval.recipe.*compile"):
        load_config("demo", ["eval.recipe.recipe=soft_label"])  # the demo preset compiles its eval step


def test_teacher_is_required_by_soft_label_and_refused_elsewhere():
    data = tiny_set(10)
    with pytest.raises(ConfigError, match="the soft_label recipe needs a teacher"):
        train_classifier(net(), data, section(), progress=False)
    with pytest.raises(ConfigError, match="only used by the soft_label recipe"):
        train_classifier(net(), data, section(recipe="hard_label"), teacher=teacher_net(), progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        train_classifier(net(), data, section(temperature=0.0), teacher=teacher_net(), progress=False)


# ------------------------------------------------------------------ distributed (two CPU processes)

DDP_SECTION = dict(epochs=4, batch_size=8, distributed=True)  # 41 images: the last batch leaves rank 1 empty


def ddp_training(runtime=None):
    model = net()
    history = train_classifier(model, tiny_set(41), section(**DDP_SECTION), teacher=teacher_net(), seed=1,
                               progress=False, runtime=runtime)
    return model, history.loss


def worker(out: Path) -> None:
    from lgd.runtime import Runtime

    runtime = Runtime()
    try:
        model, loss = ddp_training(runtime)
        torch.save({"state": model.state_dict(), "loss": loss, "world": runtime.world}, out / f"rank{runtime.rank}.pt")
    finally:
        runtime.shutdown()


@pytest.mark.slow
def test_ddp_soft_label_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), __file__, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    model, loss = ddp_training()  # one process: the same recipe, other float reduction order
    torch.testing.assert_close(ranks[0]["loss"], loss, rtol=1e-4, atol=1e-6)
    # The conv biases feeding a per-channel GroupNorm have a zero true gradient: Adam turns its
    # rounding noise (which differs with the reduction order) into lr-sized steps. The norm
    # removes them, so they change nothing the network computes: compare the rest, and outputs.
    inert = {f"features.{i}.bias" for i in (0, 4, 8)}
    for key, value in model.state_dict().items():
        if key not in inert:
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    twin = net()
    twin.load_state_dict(ranks[0]["state"])
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(tiny_set(41)[0]), model.eval()(tiny_set(41)[0]), rtol=1e-3, atol=1e-4)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
