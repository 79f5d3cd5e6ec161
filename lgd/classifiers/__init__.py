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
from functools import partial

from lgd.classifiers.base import ImageClassifier, Stat, instance_norm
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


__all__ = [
    "CLASSIFIERS",
    "ConvNet",
    "ImageClassifier",
    "ResNet",
    "build_classifier",
    "canonical_name",
    "instance_norm",
    "resnet18",
    "resnet_ap10",
]
