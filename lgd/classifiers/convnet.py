"""ConvNet-D, the standard dataset-distillation network.

D blocks of conv3x3 -> instance norm -> ReLU -> AvgPool2d(2), then one linear layer on the
flattened feature map. The feature size follows from the input size. A block skips its
pooling when pooling would shrink the map below 2x2: instance norm over a single pixel
outputs a constant, which would silence every deeper layer (e.g. ConvNet-6 on 28/32 px).
At the sizes the literature uses (ConvNet-3 at 28/32 px, ConvNet-5/6 at 128/224 px) every
block pools, as in the original network.
"""
from __future__ import annotations

import torch
from torch import nn

from lgd.classifiers.base import ImageClassifier, Stat, instance_norm
from lgd.errors import ConfigError


class ConvNet(ImageClassifier):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        depth: int = 3,
        width: int = 128,
        mean: Stat = 0.5,
        std: Stat = 0.5,
    ):
        super().__init__(in_channels, image_size, mean, std)
        if depth < 1 or width < 1 or image_size < 1:
            raise ConfigError(f"ConvNet needs depth, width and image_size >= 1, got {depth}, {width}, {image_size}")
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), instance_norm(width), nn.ReLU()]
            if size // 2 >= 2:
                layers.append(nn.AvgPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.prepare(x)).flatten(1))
