"""The dataset contract every loader follows, the in-memory dataset, and index helpers.

Every dataset yields (image float32 [C, H, W] in [0, 1], int label) and exposes
`labels` (long [N]), `classes` (names, label order), `num_classes`, `channels`,
`image_size`. In-memory sets also expose `images` (uint8 [N, C, H, W]) for batched use.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lgd.errors import DataError


class LabelledImages(Protocol):
    labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class TensorImageDataset(Dataset):
    """Images kept as uint8 (4x smaller than float); converted to [0, 1] per access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise DataError(f"images must be uint8 [N, C, H, W] with H == W, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"labels must be [N] with N = {images.shape[0]}, got {tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"labels must lie in [0, {len(classes)}), got [{labels.min()}, {labels.max()}]")
        self.images = images
        self.labels = labels
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255.0, int(self.labels[index])

    def subset(self, indices: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes)

    def resized(self, size: int) -> TensorImageDataset:
        """A copy at size x size (bilinear, antialiased when shrinking), still uint8."""
        if size == self.image_size:
            return self
        out = F.interpolate(self.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = out.round_().clamp_(0, 255).to(torch.uint8)
        return TensorImageDataset(images, self.labels, self.classes)


def class_indices(dataset: LabelledImages, c: int) -> torch.Tensor:
    """Indices (long, ascending) of the samples with label c."""
    return (dataset.labels == c).nonzero().flatten()


def per_class_subset(dataset: LabelledImages, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """A random real subset with `ipc` images of every class (the Random baseline).

    Returns long indices grouped by class (class 0 first); the same generator state gives
    the same subset.
    """
    chosen = []
    for c in range(dataset.num_classes):
        idx = class_indices(dataset, c)
        if len(idx) < ipc:
            raise DataError(f"class {c} ({dataset.classes[c]}) has {len(idx)} images, fewer than ipc={ipc}")
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    return torch.cat(chosen)
