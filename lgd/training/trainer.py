"""Classifier training: one entry point, two engines, and top-1 scoring.

`train_classifier` trains one model, `train_classifiers` many independent ones that share a
recipe and shapes; TrainSection.engine picks the loop:
- reference: this module's plain eager loop (nn.Module forward, `loss.backward()`,
  torch.optim.SGD with MultiStepLR; AdamW with a quarter cosine for soft_label), kept as the
  readable twin the fast engine is checked against;
- fast: lgd.training.fast, one functional SGD step (compiled with TrainSection.compile),
  micro-batched to the CPU cache, members of a group stacked or run in turn.
Both draw the same data order and augmentation from the same generator, so they train the
same models up to float rounding (tests/test_fast_training.py). The soft_label recipe always
runs the reference loop, whatever the engine (the fast engine's step is functional SGD).

Recipes (TrainSection.recipe; constants and schedules in lgd.training.recipes):
- hard_label: IDC / Minimax protocol. SGD (lr, momentum, weight decay, batch size from the
  section), LR x0.2 at 2/3 and 5/6 of training, hard-label augmentation + CutMix. Epochs from
  the section, else by IPC: <= 10: 2000, <= 50: 1500, else 1000.
- dc: DC/DSA ConvNet protocol. SGD (lr, momentum, weight decay from the section), batch 256,
  LR x0.1 at half of training, DSA augmentation, 300 epochs unless the section says otherwise.
- plain: SGD from the section, no augmentation, constant LR (IGD's surrogate), 50 epochs
  unless the section says otherwise.
- soft_label: RDED / SRe2L evaluation protocol, with a teacher network (`teacher=`). Every
  batch is augmented (RandomResizedCrop scale 0.5-1 + flip, then CutMix, always on), the
  teacher (eval mode, no_grad) labels the mixed images, and the loss is
  KLDivLoss(batchmean)(log_softmax(student / T), softmax(teacher / T)), T = section.temperature,
  no T^2 factor. AdamW(lr, betas (0.9, 0.999), weight_decay; none on parameters of dim <= 1),
  LR lr * 0.5 * (1 + cos(pi * e / E / 2)) in epoch e = 0..E-1 (a quarter cosine ending near
  0.5x), batch size from the section, 300 epochs unless the section says otherwise. The
  teacher sees what the student sees (the augmented [0, 1] images; lgd classifiers fit
  them to their own size and statistics); it is moved to the device, its weights are left untouched and
  its training flag is restored.

Each model fits its input to its own size (`ImageClassifier.fit_input`, antialiased bilinear)
before augmentation, so a training image is augmented at the size the network sees.
Data order and augmentation parameters come from one CPU torch.Generator seeded with `seed`:
the same seed and the same initial weights give the same run (bit-identical on CPU; on GPU
up to cuDNN's own non-determinism).

Distributed (section.distributed, a Runtime of several processes): the model is wrapped in
DistributedDataParallel on the process group Accelerate set up (gloo on CPU, nccl on GPU).
Every rank draws the same order and augmentation parameters from its identically seeded
generator, augments the whole global batch of batch_size images, and runs the network on
its own contiguous share of it; DDP averages the gradients. Same recipe as one process,
not the same bits (the all-reduce adds in another order). A Dataset source is read in full
by every rank (the augmentation needs the whole batch); in-memory tensors cost nothing.
DDP training always runs the reference loop, whatever the engine. With soft_label, each rank
runs its own (identical) teacher on its share of the mixed global batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lgd.classifiers.base import fit_input
from lgd.config import TrainSection
from lgd.errors import ConfigError, DataError, LgdError
from lgd.progress import progress_bar
from lgd.training.recipes import (
    RECIPES,
    Data,
    Source,
    TrainHistory,
    augmenter,
    batch_size_of,
    default_epochs,
    lr_milestones,
    recipe_loss,
    soft_label_loss,
    soft_label_lr_factor,
)

if TYPE_CHECKING:
    from lgd.runtime import Runtime

log = logging.getLogger(__name__)
_SOFT_LABEL_NOTED = False  # the soft_label engine note is logged once per process


def _loss_fn(recipe: str, model: nn.Module, generator: torch.Generator,
             forward: nn.Module | None = None, rank: int = 0, world: int = 1, *,
             teacher: nn.Module | None = None, temperature: float = 1.0) -> Callable:
    """(images, labels) -> loss with the recipe's augmentation.

    soft_label: `teacher` (already in eval mode) labels the augmented images under no_grad
    and the loss is soft_label_loss at `temperature`.

    With world > 1 (`forward` the DDP-wrapped model) the whole global batch is augmented --
    CutMix pairs images across all of it -- and this rank's contiguous share goes through the
    network (and the teacher). Its mean loss is weighted by share * world / batch, so DDP's
    gradient average is the gradient of the whole batch's mean loss, as on one process.
    """
    augment = augmenter(recipe, model, generator)
    forward = forward or model

    def objective(logits: torch.Tensor, x: torch.Tensor, targets: tuple) -> torch.Tensor:
        if recipe != "soft_label":
            return recipe_loss(logits, targets)
        with torch.no_grad():
            soft = teacher(x)
        return soft_label_loss(logits, soft, temperature)

    def loss(x, y):
        x, targets = augment(fit_input(model, x), y)
        if world == 1:
            return objective(forward(x), x, targets)
        b = len(y)
        part = slice(b * rank // world, b * (rank + 1) // world)
        logits = forward(x[part])
        share = part.stop - part.start
        if share == 0:  # a last batch smaller than the world: join the gradient all-reduce with zeros
            return logits.sum() * 0
        return objective(logits, x[part], tuple(t[part] if t.dim() else t for t in targets)) * (share * world / b)
    return loss


def recipe_optimizer(section: TrainSection, model: nn.Module, epochs: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The reference loop's optimizer and per-epoch scheduler for `section`'s recipe.

    soft_label: AdamW(lr, betas (0.9, 0.999), weight_decay) with weight decay only on
    parameters of dim > 1 (no decay on biases and norm weights, as RDED's get_parameters),
    and RDED's LambdaLR quarter cosine (soft_label_lr_factor). Otherwise SGD (lr, momentum,
    weight decay) with MultiStepLR at the recipe's milestones.
    """
    if section.recipe == "soft_label":
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=section.lr, betas=(0.9, 0.999),
                                      weight_decay=section.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: soft_label_lr_factor(e, epochs))
        return optimizer, scheduler
    optimizer = torch.optim.SGD(model.parameters(), lr=section.lr, momentum=section.momentum,
                                weight_decay=section.weight_decay)
    milestones, factor = lr_milestones(section.recipe, epochs)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=factor)


def _check_in_sync(model: nn.Module, runtime: Runtime) -> None:
    """DDP keeps the replicas equal (same averaged gradients, same optimizer steps): verify it
    with one small gather of per-tensor sums, compared as bytes (NaN-safe)."""
    fingerprint = torch.stack([t.detach().double().sum().cpu() for t in model.state_dict().values()])
    prints = runtime.gather([fingerprint.numpy().tobytes()])
    if len(set(prints)) != 1:
        raise LgdError("distributed training ended with different weights on different processes")


def train_classifier(
    model: nn.Module,
    data: Data,
    section: TrainSection,
    *,
    ipc: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    eval_data: Data | None = None,
    track: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 1,
    progress: bool = True,
    runtime: Runtime | None = None,
    teacher: nn.Module | None = None,
) -> TrainHistory:
    """Train `model` in place with `section`'s recipe and engine; it is left in eval mode.

    on_epoch(e, model) runs before training (e = 0) and after every epoch e = 1..E.
    eval_data: scored (top-1) every `eval_every` epochs and after the last one.
    track: (images, labels) whose true-class probability is recorded after every epoch.
    ipc: images per class, for the hard-label epoch rule (inferred from the labels if None).
    teacher: the soft_label recipe's teacher (required there, refused by the other recipes).
    runtime: with section.distributed and several processes, every rank must call this with the
    same arguments; they train one model together (DDP) and all end with the same weights.
    Otherwise the runtime is ignored and this process trains alone.
    """
    member = Member(model, data, seed, on_epoch=on_epoch, track=track)
    return train_classifiers([member], section, ipc=ipc, device=device,
                             eval_data=eval_data, eval_every=eval_every, progress=progress, runtime=runtime,
                             teacher=teacher)[0]


@dataclass
class Member:
    """One training of a group: its model (trained in place), data, seed (data order and
    augmentation draws), and optional per-epoch hooks (see train_classifier)."""

    model: nn.Module
    data: Data
    seed: int
    on_epoch: Callable[[int, nn.Module], None] | None = None
    track: tuple[torch.Tensor, torch.Tensor] | None = None


def train_classifiers(
    members: list[Member],
    section: TrainSection,
    *,
    ipc: int | None = None,
    device: str | torch.device = "cpu",
    eval_data: Data | None = None,
    eval_every: int = 1,
    progress: bool = True,
    runtime: Runtime | None = None,
    teacher: nn.Module | None = None,
) -> list[TrainHistory]:
    """Independent trainings with one recipe, one per member, each equal to its lone training.

    Members must share the architecture and the number of training images (so their batches
    line up); the fast engine then trains them as one group (lgd.training.fast), the reference
    engine one after the other. Returns one history per member, in order.

    teacher: the soft_label recipe's teacher, shared by all members (required there, refused
    by the other recipes); moved to `device`, used in eval mode under no_grad, its training
    flag restored afterwards. soft_label always trains with the reference loop.
    """
    global _SOFT_LABEL_NOTED
    if section.recipe not in RECIPES:
        raise ConfigError(f"unknown training recipe {section.recipe!r}; choose from {', '.join(RECIPES)}")
    soft = section.recipe == "soft_label"
    if soft and teacher is None:
        raise ConfigError("the soft_label recipe needs a teacher: pass teacher=<trained classifier> "
                          "(it labels every augmented batch)")
    if teacher is not None and not soft:
        raise ConfigError(f"a teacher is only used by the soft_label recipe, not by {section.recipe}")
    if soft and not section.temperature > 0:
        raise ConfigError(f"the soft_label recipe needs a positive temperature, got {section.temperature}")
    if eval_every < 1:
        raise ConfigError(f"eval_every must be at least 1, got {eval_every}")
    if not members:
        return []
    device = torch.device(device)
    sources = [Source(m.data, device) for m in members]
    if any(len(s) == 0 for s in sources):
        raise DataError("cannot train a classifier on an empty image set")
    if len({len(s) for s in sources}) > 1 or len({repr(m.model) for m in members}) > 1:
        raise ConfigError("trainings grouped together must share the architecture and the number of images")
    if section.epochs:
        epochs = section.epochs
    else:  # only hard_label's default depends on the IPC
        epochs = default_epochs(section.recipe, ipc or (sources[0].ipc() if section.recipe == "hard_label" else 0))
    batch_size = batch_size_of(section)
    for m in members:
        m.model.to(device)
    if soft:
        if not _SOFT_LABEL_NOTED:
            log.info("the soft_label recipe trains with the reference loop (eager nn.Module, torch.optim.AdamW), "
                     "whatever TrainSection.engine says")
            _SOFT_LABEL_NOTED = True
        teacher.to(device)
        was_training = teacher.training
        teacher.eval()
        try:
            return [_train_reference(m, source, section, epochs=epochs, batch_size=batch_size,
                                     device=device, eval_data=eval_data,
                                     eval_every=eval_every, progress=progress, runtime=runtime, teacher=teacher)
                    for m, source in zip(members, sources)]
        finally:
            teacher.train(was_training)
    if section.engine == "fast" and not (section.distributed and runtime is not None and runtime.world > 1):
        from lgd.training.fast import train_group

        return train_group(members, sources, section, epochs=epochs, batch_size=batch_size,
                           device=device, eval_data=eval_data,
                           eval_every=eval_every, progress=progress)
    return [_train_reference(m, source, section, epochs=epochs, batch_size=batch_size,
                             device=device, eval_data=eval_data,
                             eval_every=eval_every, progress=progress, runtime=runtime)
            for m, source in zip(members, sources)]


def _train_reference(member: Member, source: Source, section: TrainSection, *, epochs: int, batch_size: int,
                     device: torch.device, eval_data: Data | None, eval_every: int,
                     progress: bool, runtime: Runtime | None, teacher: nn.Module | None = None) -> TrainHistory:
    """The reference loop: plain eager nn.Module training with torch.optim (`teacher`, in
    eval mode: soft_label's)."""
    model, on_epoch = member.model, member.on_epoch
    optimizer, scheduler = recipe_optimizer(section, model, epochs)
    generator = torch.Generator().manual_seed(member.seed)  # CPU: data order and augmentation parameters
    together = section.distributed and runtime is not None and runtime.world > 1
    if together:
        from torch.nn.parallel import DistributedDataParallel

        # Construction broadcasts rank 0's weights, so all replicas start equal.
        forward, rank, world = DistributedDataParallel(model), runtime.rank, runtime.world
    else:
        forward, rank, world = model, 0, 1
    loss_fn = _loss_fn(section.recipe, model, generator, forward, rank, world,
                       teacher=teacher, temperature=section.temperature)
    tracked = Source(member.track, device) if member.track is not None else None
    confidences = []
    history = TrainHistory(epochs=epochs)

    if on_epoch is not None:
        on_epoch(0, model)
    bar = progress_bar(range(1, epochs + 1), desc=f"train {section.recipe}", unit="epoch", leave=False, disable=not progress)
    for epoch in bar:
        model.train()
        history.lr.append(optimizer.param_groups[0]["lr"])
        total, count = torch.zeros((), device=device), 0
        for x, y in source.batches(batch_size, generator):
            loss = loss_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * (len(y) / world)  # this rank's share of the batch's loss sum
            count += len(y)
        scheduler.step()
        if together:
            torch.distributed.all_reduce(total)
        history.loss.append(float(total) / count)  # one host sync per epoch
        if eval_data is not None and (epoch % eval_every == 0 or epoch == epochs):
            history.test_epochs.append(epoch)
            history.test_accuracy.append(accuracy(model, eval_data, device))
        if tracked is not None:
            confidences.append(true_class_probability(model, tracked, device))
        if on_epoch is not None:
            on_epoch(epoch, model)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
    if tracked is not None:
        history.confidence = torch.stack(confidences)
    if together:
        _check_in_sync(model, runtime)
    model.eval()
    return history


@torch.inference_mode()
def _logits(model: nn.Module, data, device, batch_size: int):
    """(logits, labels) over the whole set, eval mode, no augmentation; restores the mode."""
    device = torch.device(device)
    source = data if isinstance(data, Source) else Source(data, device)
    was_training = model.training
    model.eval()
    try:
        outs = [(model(x), y) for x, y in source.batches(batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        raise DataError("cannot score a classifier on an empty image set")
    return torch.cat([o for o, _ in outs]), torch.cat([y for _, y in outs])


def accuracy(model: nn.Module, data: Data, device: str | torch.device = "cpu", batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] (eval mode, no augmentation; the model fits the input size)."""
    logits, labels = _logits(model, data, device, batch_size)
    return float((logits.argmax(1) == labels).float().mean())


def true_class_probability(model: nn.Module, data: Data, device: str | torch.device = "cpu", batch_size: int = 256, *,
                           on_device: bool = False) -> torch.Tensor:
    """Softmax probability of each sample's own label, [N] on the CPU (on_device: left on the
    device, no host sync)."""
    logits, labels = _logits(model, data, device, batch_size)
    p = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    return p if on_device else p.cpu()


@torch.inference_mode()
def accuracies(models: list[nn.Module], data: Data, device: str | torch.device = "cpu", batch_size: int = 256, *,
               on_device: bool = False) -> list[float] | torch.Tensor:
    """Top-1 of each model on the same set, in one pass over it (each batch is loaded and
    resized once for all models). A list after one host sync, or with on_device the [M]
    tensor on the device and no sync at all."""
    device = torch.device(device)
    source = data if isinstance(data, Source) else Source(data, device)
    modes = [m.training for m in models]
    correct, count = torch.zeros(len(models), device=device), 0
    try:
        for m in models:
            m.eval()
        for x, y in source.batches(batch_size):
            x = fit_input(models[0], x)  # resized once for all models
            correct += torch.stack([(m(x).argmax(1) == y).sum() for m in models])
            count += len(y)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if count == 0:
        raise DataError("cannot score a classifier on an empty image set")
    return correct / count if on_device else (correct / count).tolist()
