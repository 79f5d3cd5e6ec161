"""Classifier training with the recipes of method.md §7, and top-1 accuracy.

Recipes (TrainSection.recipe):
- hard_label: IDC / Minimax protocol. SGD (lr, momentum, weight decay, batch size from the
  section), LR x0.2 at 2/3 and 5/6 of training, hard-label augmentation + CutMix. Epochs from
  the section, else by IPC: <= 10: 2000, <= 50: 1500, else 1000.
- dc: DC/DSA ConvNet protocol. SGD (lr, momentum, weight decay from the section), batch 256,
  LR x0.1 at half of training, DSA augmentation, 300 epochs unless the section says otherwise.
- plain: SGD from the section, no augmentation, constant LR (IGD's surrogate), 50 epochs
  unless the section says otherwise.

Images are resized (antialiased bilinear) to `classifier_size` when it differs from theirs.
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
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lgd.config import TrainSection
from lgd.errors import ConfigError, DataError, LgdError
from lgd.training.augment import cutmix, dsa_augment, hard_label_augment, mixed_cross_entropy

if TYPE_CHECKING:
    from lgd.runtime import Runtime

RECIPES = ("hard_label", "dc", "plain")
DC_BATCH_SIZE = 256
_PLAIN_EPOCHS = 50  # IGD's surrogate
_DC_EPOCHS = 300

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainHistory:
    """What happened during training, one entry per epoch (epoch e = after e epochs)."""

    epochs: int
    loss: list[float] = field(default_factory=list)  # mean training loss of each epoch
    lr: list[float] = field(default_factory=list)  # learning rate used during each epoch
    test_epochs: list[int] = field(default_factory=list)  # epochs at which eval_data was scored
    test_accuracy: list[float] = field(default_factory=list)  # top-1 in [0, 1] at those epochs
    confidence: torch.Tensor | None = None  # [epochs, len(track)] true-class probability after each epoch


def default_epochs(recipe: str, ipc: int) -> int:
    if recipe == "dc":
        return _DC_EPOCHS
    if recipe == "plain":
        return _PLAIN_EPOCHS
    return 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000


def lr_milestones(recipe: str, epochs: int) -> tuple[list[int], float]:
    """Epochs after which the LR is multiplied by the returned factor."""
    if recipe == "hard_label":
        return [2 * epochs // 3, 5 * epochs // 6], 0.2
    if recipe == "dc":
        return [epochs // 2], 0.1
    return [], 1.0


class _Source:
    """Labelled images served in batches on the training device: an in-memory tensor pair
    (anything with `.images`/`.labels` tensors, kept on the device, uint8 or float) or any
    Dataset of (image, label) through a DataLoader."""

    def __init__(self, data: Data | object, device: torch.device):
        self.device = device
        pair = _tensor_pair(data)
        if pair is not None:
            images, labels = pair
            if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
                raise DataError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}")
            self.images, self.labels = images.to(device), labels.long().to(device)
            self.dataset = None
        elif isinstance(data, Dataset):
            self.dataset, self.images, self.labels = data, None, getattr(data, "labels", None)
        else:
            raise DataError(f"training data must be a Dataset or an (images, labels) pair, got {type(data).__name__}")
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)

    def ipc(self) -> int:
        if not isinstance(self.labels, torch.Tensor):
            raise ConfigError("cannot infer the IPC of this dataset: pass ipc= or set the section's epochs")
        return int(torch.bincount(self.labels.cpu()).max())

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float [0, 1] images, long labels) on the device; shuffled when a generator is given."""
        if self.images is not None:
            n = len(self.images)
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            order = order.to(self.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield _as_float(self.images[idx]), self.labels[idx]
            return
        if self._loader is None or self._loader.batch_size != batch_size:
            workers = 0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)
            self._loader = DataLoader(
                self.dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            )
        for x, y in self._loader:
            yield _as_float(x.to(self.device, non_blocking=True)), y.long().to(self.device, non_blocking=True)


def _tensor_pair(data) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return images, labels
    return None


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def fit_size(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize a batch to size x size (antialiased bilinear) if it is not that size already."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _normalisation(model: nn.Module) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The classifier's input mean/std (buffers of lgd classifiers), 0.5/0.5 otherwise."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return mean, std
    return 0.5, 0.5


Criterion = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits of batch rows `part`, part) -> mean loss


def _augment_fn(recipe: str, model: nn.Module, generator: torch.Generator) -> Callable:
    """(images, labels) -> (augmented images, criterion) with the recipe's augmentation."""
    if recipe == "hard_label":
        def augment(x, y) -> tuple[torch.Tensor, Criterion]:
            x = hard_label_augment(x, x.shape[-1], generator)
            x, partner, lam = cutmix(x, y, generator)
            return x, lambda logits, part: mixed_cross_entropy(logits, y[part], partner[part], lam)
    elif recipe == "dc":
        mean, std = _normalisation(model)

        def augment(x, y) -> tuple[torch.Tensor, Criterion]:
            return dsa_augment(x, generator, mean=mean, std=std), lambda logits, part: F.cross_entropy(logits, y[part])
    else:
        def augment(x, y) -> tuple[torch.Tensor, Criterion]:
            return x, lambda logits, part: F.cross_entropy(logits, y[part])
    return augment


def _loss_fn(recipe: str, model: nn.Module, size: int | None, generator: torch.Generator,
             forward: nn.Module | None = None, rank: int = 0, world: int = 1) -> Callable:
    """(images, labels) -> loss with the recipe's augmentation.

    With world > 1 (`forward` the DDP-wrapped model) the whole global batch is augmented --
    CutMix pairs images across all of it -- and this rank's contiguous share goes through the
    network. Its mean loss is weighted by share * world / batch, so DDP's gradient average is
    the gradient of the whole batch's mean loss, as on one process.
    """
    augment = _augment_fn(recipe, model, generator)
    forward = forward or model

    def loss(x, y):
        x, criterion = augment(fit_size(x, size), y)
        if world == 1:
            return criterion(forward(x), slice(None))
        b = len(y)
        part = slice(b * rank // world, b * (rank + 1) // world)
        logits = forward(x[part])
        share = part.stop - part.start
        if share == 0:  # a last batch smaller than the world: join the gradient all-reduce with zeros
            return logits.sum() * 0
        return criterion(logits, part) * (share * world / b)
    return loss


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
    classifier_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    eval_data: Data | None = None,
    track: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 1,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> TrainHistory:
    """Train `model` in place with `section`'s recipe; it is left in eval mode.

    on_epoch(e, model) runs before training (e = 0) and after every epoch e = 1..E.
    eval_data: scored (top-1) every `eval_every` epochs and after the last one.
    track: (images, labels) whose true-class probability is recorded after every epoch.
    ipc: images per class, for the hard-label epoch rule (inferred from the labels if None).
    runtime: with section.distributed and several processes, every rank must call this with the
    same arguments; they train one model together (DDP) and all end with the same weights.
    Otherwise the runtime is ignored and this process trains alone.
    """
    if section.recipe not in RECIPES:
        raise ConfigError(f"unknown training recipe {section.recipe!r}; choose from {', '.join(RECIPES)}")
    if eval_every < 1:
        raise ConfigError(f"eval_every must be at least 1, got {eval_every}")
    device = torch.device(device)
    model.to(device)
    source = _Source(data, device)
    if len(source) == 0:
        raise DataError("cannot train a classifier on an empty image set")
    epochs = section.epochs or default_epochs(section.recipe, ipc or source.ipc())
    batch_size = DC_BATCH_SIZE if section.recipe == "dc" else section.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=section.lr, momentum=section.momentum,
                                weight_decay=section.weight_decay)
    milestones, factor = lr_milestones(section.recipe, epochs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=factor)
    generator = torch.Generator().manual_seed(seed)  # CPU: data order and augmentation parameters
    together = section.distributed and runtime is not None and runtime.world > 1
    if together:
        from torch.nn.parallel import DistributedDataParallel

        # Construction broadcasts rank 0's weights, so all replicas start equal.
        forward, rank, world = DistributedDataParallel(model), runtime.rank, runtime.world
    else:
        forward, rank, world = model, 0, 1
    loss_fn = _loss_fn(section.recipe, model, classifier_size, generator, forward, rank, world)
    tracked = _Source(track, device) if track is not None else None
    confidences = []
    history = TrainHistory(epochs=epochs)

    if on_epoch is not None:
        on_epoch(0, model)
    bar = tqdm(range(1, epochs + 1), desc=f"train {section.recipe}", unit="epoch", leave=False, disable=not progress)
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
            history.test_accuracy.append(accuracy(model, eval_data, device, classifier_size=classifier_size))
        if tracked is not None:
            confidences.append(true_class_probability(model, tracked, device, classifier_size=classifier_size))
        if on_epoch is not None:
            on_epoch(epoch, model)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
    if tracked is not None:
        history.confidence = torch.stack(confidences)
    if together:
        _check_in_sync(model, runtime)
    model.eval()
    return history


@torch.no_grad()
def _logits(model: nn.Module, data, device, batch_size: int, classifier_size: int | None):
    """(logits, labels) over the whole set, eval mode, no augmentation; restores the mode."""
    device = torch.device(device)
    source = data if isinstance(data, _Source) else _Source(data, device)
    was_training = model.training
    model.eval()
    try:
        outs = [(model(fit_size(x, classifier_size)), y) for x, y in source.batches(batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        raise DataError("cannot score a classifier on an empty image set")
    return torch.cat([o for o, _ in outs]), torch.cat([y for _, y in outs])


def accuracy(model: nn.Module, data: Data, device: str | torch.device = "cpu", batch_size: int = 256, *,
             classifier_size: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] (eval mode, no augmentation, images resized to classifier_size)."""
    logits, labels = _logits(model, data, device, batch_size, classifier_size)
    return float((logits.argmax(1) == labels).float().mean())


def true_class_probability(model: nn.Module, data: Data, device: str | torch.device = "cpu", batch_size: int = 256, *,
                           classifier_size: int | None = None) -> torch.Tensor:
    """Softmax probability of each sample's own label, [N] on the CPU."""
    logits, labels = _logits(model, data, device, batch_size, classifier_size)
    return logits.softmax(1).gather(1, labels[:, None]).squeeze(1).cpu()
