"""What both training engines share: the recipes' constants and schedules, the data source,
the training history, the input resize and the augmentation with its targets (and the
soft_label recipe's loss and LR schedule, which only the reference loop runs)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lgd.errors import ConfigError, DataError
from lgd.training.augment import cutmix, dsa_augment, hard_label_augment, mixed_cross_entropy, soft_label_augment

RECIPES = ("hard_label", "dc", "plain", "augmented", "soft_label")
DC_BATCH_SIZE = 256
_PLAIN_EPOCHS = 50  # IGD's surrogate
_DC_EPOCHS = 300
_SOFT_LABEL_EPOCHS = 300  # RDED's evaluation

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


def batch_size_of(section) -> int:
    """The batch size a training section trains with (the dc recipe's is fixed by its protocol)."""
    return DC_BATCH_SIZE if section.recipe == "dc" else section.batch_size


def default_epochs(recipe: str, ipc: int) -> int:
    if recipe == "dc":
        return _DC_EPOCHS
    if recipe in ("plain", "augmented"):
        return _PLAIN_EPOCHS
    if recipe == "soft_label":
        return _SOFT_LABEL_EPOCHS
    return 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000


def lr_milestones(recipe: str, epochs: int) -> tuple[list[int], float]:
    """Epochs after which the LR is multiplied by the returned factor (soft_label has no
    milestones: its schedule is `soft_label_lr_factor`)."""
    if recipe == "hard_label":
        return [2 * epochs // 3, 5 * epochs // 6], 0.2
    if recipe == "dc":
        return [epochs // 2], 0.1
    return [], 1.0


def soft_label_lr_factor(epoch: int, epochs: int) -> float:
    """soft_label's LR multiplier during epoch `epoch` (0-based) of `epochs`: RDED's LambdaLR,
    0.5 * (1 + cos(pi * epoch / epochs / 2)), a quarter cosine from 1 that would reach 0.5 at
    epoch == epochs (the last epoch trains just above 0.5x; it never decays to 0)."""
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs / 2))


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """RDED's soft-label loss: KLDivLoss(batchmean) of the student's temperature-softened
    log-probabilities against the teacher's softened probabilities -- the sum over classes of
    p_t * (log p_t - log p_s), averaged over the batch, with no T^2 factor (RDED omits it)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean")


class Source:
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


def _normalisation(model: nn.Module) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The classifier's input mean/std (buffers of lgd classifiers), 0.5/0.5 otherwise."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return mean, std
    return 0.5, 0.5


Targets = tuple[torch.Tensor, ...]  # (labels,) or, after CutMix, (labels, partner labels, lam)


def augmenter(recipe: str, model: nn.Module, generator: torch.Generator) -> Callable:
    """(images, labels) -> (augmented images, targets) with the recipe's augmentation, its
    random parameters drawn from `generator` (both engines make exactly these draws).
    soft_label's targets are (labels,) for bookkeeping only: its loss is against the
    teacher's logits on the augmented images (lgd.training.trainer)."""
    if recipe == "soft_label":
        def augment(x, y) -> tuple[torch.Tensor, Targets]:
            return soft_label_augment(x, x.shape[-1], generator), (y,)
    elif recipe == "hard_label":
        def augment(x, y) -> tuple[torch.Tensor, Targets]:
            x = hard_label_augment(x, x.shape[-1], generator)
            x, partner, lam = cutmix(x, y, generator)
            return x, (y, partner, lam)
    elif recipe == "augmented":  # IGD's official surrogate: the hard-label augmentation without CutMix
        def augment(x, y) -> tuple[torch.Tensor, Targets]:
            return hard_label_augment(x, x.shape[-1], generator), (y,)
    elif recipe == "dc":
        mean, std = _normalisation(model)

        def augment(x, y) -> tuple[torch.Tensor, Targets]:
            return dsa_augment(x, generator, mean=mean, std=std), (y,)
    else:
        def augment(x, y) -> tuple[torch.Tensor, Targets]:
            return x, (y,)
    return augment


def recipe_loss(logits: torch.Tensor, targets: Targets, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) loss over the batch: cross-entropy, or CutMix's area-weighted pair of them."""
    if len(targets) == 3:
        return mixed_cross_entropy(logits, *targets, reduction=reduction)
    return F.cross_entropy(logits, targets[0], reduction=reduction)
