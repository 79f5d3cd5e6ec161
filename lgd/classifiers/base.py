"""Pieces every classifier shares: input normalisation and the instance-norm layer.

Classifiers take images in [0, 1] and normalise internally, so callers (the sampler, the
trainer, the VAE decode path) never need to know a network's input statistics.
Everything here is functional-friendly: no in-place ops and no running statistics, so the
networks work under double backward and torch.func (vmap / grad / functional_call).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lgd.errors import ConfigError

Stat = float | Sequence[float]


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


class ImageClassifier(nn.Module):
    """Base class: stores per-channel mean/std (persistent buffers, so a checkpoint carries
    the normalisation it was trained with) and maps [0, 1] inputs to normalised ones."""

    def __init__(self, in_channels: int, mean: Stat = 0.5, std: Stat = 0.5):
        super().__init__()
        std_t = _per_channel(std, in_channels, "std")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"classifier std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", _per_channel(mean, in_channels, "mean"))
        self.register_buffer("std", std_t)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
