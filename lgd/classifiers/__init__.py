"""Classifiers used by the engine: a registry of named networks and one factory.

Canonical names: convnet3 .. convnet6, resnet_ap10, resnet18 (instance norm, IDC lineage) and
resnet18_bn (torchvision's ResNet-18 with batch norm: RDED's student and teacher, reference
training loop only). Paper-style spellings
("ConvNet-6", "ResNetAP-10", "ResNet-18") are accepted, case-insensitively.
Every network takes images in [0, 1] ([B, C, H, W], H = W = image_size) and returns logits
[B, num_classes]; normalisation with the given mean/std happens inside.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from lgd.classifiers.base import ImageClassifier, Stat, fit_input, input_statistics, instance_norm
from lgd.classifiers.convnet import ConvNet
from lgd.classifiers.resnet import ResNet, resnet18, resnet_ap10
from lgd.classifiers.torchvision_resnet import resnet18_bn
from lgd.errors import ConfigError

# name -> factory(in_channels, num_classes, image_size, **kwargs)
CLASSIFIERS: dict[str, Callable[..., ImageClassifier]] = {
    **{f"convnet{d}": partial(ConvNet, depth=d) for d in range(3, 7)},
    "resnet_ap10": resnet_ap10,
    "resnet18": resnet18,
    "resnet18_bn": resnet18_bn,
}
RUNNING_STATISTICS = ("resnet18_bn",)  # networks with batch norm: the reference training loop only


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_KEY = {_key(name): name for name in CLASSIFIERS}


def canonical_name(name: str) -> str:
    """Map a spelling such as "ConvNet-6" or "ResNetAP-10" to its registry name."""
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        raise ConfigError(f"unknown classifier {name!r}; valid names: {', '.join(CLASSIFIERS)}") from None


def build_classifier(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Stat | None = None,
    std: Stat | None = None,
    **overrides,
) -> ImageClassifier:
    """Build a registered classifier. mean/std default to 0.5 per channel; overrides go to
    the constructor (e.g. width=8 for a tiny test network)."""
    factory = CLASSIFIERS[canonical_name(name)]
    stats = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    return factory(in_channels, num_classes, image_size, **stats, **overrides)


@dataclass
class ClassifierFactory:
    """Fresh classifiers for one dataset: its channels and classes, the classifiers' input size
    and statistics (`input_statistics`), and extra constructor arguments (e.g. width for tests)."""

    channels: int
    num_classes: int
    image_size: int
    overrides: dict = field(default_factory=dict)

    def spec(self, network: str, image_size: int | None = None, **overrides) -> dict:
        """build_classifier's arguments (saved with the weights, so a checkpoint rebuilds itself)."""
        mean, std = input_statistics(self.channels)
        return {"name": network, "in_channels": self.channels, "num_classes": self.num_classes,
                "image_size": image_size or self.image_size, "mean": mean, "std": std,
                **self.overrides, **overrides}

    def __call__(self, network: str, seed: int, **spec_changes) -> ImageClassifier:
        """A classifier whose initial weights depend only on `seed` (the global RNG is left as it was)."""
        return build_seeded(self.spec(network, **spec_changes), seed)


def build_seeded(spec: dict, seed: int) -> ImageClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_classifier(**spec)


__all__ = [
    "ClassifierFactory",
    "CLASSIFIERS",
    "ConvNet",
    "ImageClassifier",
    "ResNet",
    "build_classifier",
    "build_seeded",
    "canonical_name",
    "fit_input",
    "input_statistics",
    "instance_norm",
    "resnet18",
    "resnet_ap10",
]
