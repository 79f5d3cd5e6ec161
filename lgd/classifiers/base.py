"""Pieces every classifier shares: its input (size and normalisation) and the instance-norm layer.

Classifiers take images in [0, 1] of any size and bring them to their own input size and
statistics, so callers (the trainer, guidance, scoring, evaluation) never need to know them:
one resize, the same for the image a stage model is trained on, guided with and scored on.
Everything here is functional-friendly: no in-place ops and no running statistics, so the
networks work under double backward and torch.func (vmap / grad / functional_call).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lgd.errors import ConfigError

Stat = float | Sequence[float]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_statistics(channels: int) -> tuple[list[float], list[float]]:
    """The (mean, std) a classifier of the engine normalises with: ImageNet's for colour
    images, 0.5 per channel otherwise."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * channels, [0.5] * channels


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as the dataset-distillation networks use it: one group per channel.

    GroupNorm rather than InstanceNorm2d/BatchNorm: no running buffers, so train and eval
    behave the same and per-sample gradients stay independent under vmap.
    """
    return nn.GroupNorm(channels, channels, affine=True)


def _per_channel(value: Stat, channels: int, what: str) -> torch.Tensor:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(f"classifier {what} has {len(values)} values but the input has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """x resized to size x size: antialiased bilinear (a convex combination of pixels, so [0, 1]
    stays [0, 1]), differentiable twice (IGD's guidance differentiates through it)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ImageClassifier(nn.Module):
    """Base class: owns the input size (`fit_input`) and the per-channel mean/std (persistent
    buffers, so a checkpoint carries the normalisation it was trained with)."""

    def __init__(self, in_channels: int, image_size: int, mean: Stat = 0.5, std: Stat = 0.5):
        super().__init__()
        self.image_size = image_size
        std_t = _per_channel(std, in_channels, "std")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"classifier std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", _per_channel(mean, in_channels, "mean"))
        self.register_buffer("std", std_t)

    def fit_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size at this network's input size (training augments after this)."""
        return resize(x, self.image_size)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What the first layer sees: the input fitted to size, then normalised."""
        return (self.fit_input(x) - self.mean) / self.std


def fit_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model.fit_input(x)` for lgd classifiers; other modules take their input as it is."""
    return model.fit_input(x) if isinstance(model, ImageClassifier) else x
