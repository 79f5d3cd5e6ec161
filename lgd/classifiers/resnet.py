"""ResNets with instance norm, as used to evaluate distilled ImageNet subsets (IDC lineage).

- ResNetAP-10: BasicBlocks [1, 1, 1, 1]; every downsampling is a stride-1 conv followed by
  2x2 average pooling (main path and shortcut) instead of a strided conv.
- ResNet-18: BasicBlocks [2, 2, 2, 2] with the usual strided convs.
The stem depends on the input size, so small images keep enough resolution:
  <= 64 px: conv3x3, no pooling;  65..128 px: conv3x3 + pool /2;  > 128 px: conv7x7 + pool /4
(ResNet-18: 7x7 stride 2 + max-pool; ResNetAP: 7x7 stride 1 + 4x4 average pool).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lgd.classifiers.base import ImageClassifier, Stat, instance_norm
from lgd.errors import ConfigError


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, avg_down: bool):
        super().__init__()
        conv_stride = 1 if avg_down else stride
        self.conv1 = _conv(in_ch, out_ch, 3, conv_stride)
        self.norm1 = instance_norm(out_ch)
        self.pool = nn.AvgPool2d(stride) if avg_down and stride > 1 else nn.Identity()
        self.conv2 = _conv(out_ch, out_ch, 3)
        self.norm2 = instance_norm(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif avg_down:
            self.shortcut = nn.Sequential(_conv(in_ch, out_ch, 1), nn.AvgPool2d(stride), instance_norm(out_ch))
        else:
            self.shortcut = nn.Sequential(_conv(in_ch, out_ch, 1, stride), instance_norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out-of-place add: keeps double backward and vmap safe


def _stem(in_ch: int, width: int, image_size: int, avg_down: bool) -> nn.Sequential:
    if image_size <= 64:
        return nn.Sequential(_conv(in_ch, width, 3), instance_norm(width), nn.ReLU())
    if image_size <= 128:
        pool = nn.AvgPool2d(2) if avg_down else nn.MaxPool2d(3, stride=2, padding=1)
        return nn.Sequential(_conv(in_ch, width, 3), instance_norm(width), nn.ReLU(), pool)
    if avg_down:
        return nn.Sequential(_conv(in_ch, width, 7), instance_norm(width), nn.ReLU(), nn.AvgPool2d(4))
    return nn.Sequential(
        _conv(in_ch, width, 7, stride=2), instance_norm(width), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
    )


class ResNet(ImageClassifier):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        avg_down: bool = False,
        width: int = 64,
        mean: Stat = 0.5,
        std: Stat = 0.5,
    ):
        super().__init__(in_channels, image_size, mean, std)
        if width < 1 or image_size < 1:
            raise ConfigError(f"ResNet needs width and image_size >= 1, got {width}, {image_size}")
        self.stem = _stem(in_channels, width, image_size, avg_down)
        stages: list[nn.Module] = []
        channels = width
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(channels, out_ch, stride, avg_down))
                channels = out_ch
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(self.prepare(x)))
        return self.fc(h.mean(dim=(2, 3)))


def resnet_ap10(in_channels: int, num_classes: int, image_size: int, **kwargs) -> ResNet:
    return ResNet(in_channels, num_classes, image_size, blocks=(1, 1, 1, 1), avg_down=True, **kwargs)


def resnet18(in_channels: int, num_classes: int, image_size: int, **kwargs) -> ResNet:
    return ResNet(in_channels, num_classes, image_size, blocks=(2, 2, 2, 2), avg_down=False, **kwargs)
