"""ResNet-18 with batch norm in torchvision's layout (the same state-dict keys), so that a
torchvision checkpoint on disk -- the ImageNet weights that RDED and SRe2L use as their
soft-label teacher -- loads as it is, and RDED's student network can be trained ("resnet18_bn").

Unlike the instance-norm networks of this package it keeps running statistics, so it trains
with the reference loop only (the fast engine's functional step cannot update them).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lgd.classifiers.base import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier, Stat
from lgd.errors import CheckpointError



class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet18(ImageClassifier):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, mean: Stat = 0.5,
                 std: Stat = 0.5, width: int = 64):
        super().__init__(in_channels, image_size, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        for i in range(4):
            out_ch = width * 2**i
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(channels, out_ch, stride), BasicBlock(out_ch, out_ch, 1)))
            channels = out_ch
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(self.prepare(x)))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(h.mean(dim=(2, 3)))


def resnet18_bn(in_channels: int, num_classes: int, image_size: int, **kwargs) -> TorchvisionResNet18:
    return TorchvisionResNet18(in_channels, num_classes, image_size, **kwargs)


def load_torchvision_resnet18(path: str | Path, device: str | torch.device = "cpu") -> TorchvisionResNet18:
    """A torchvision-format ResNet-18 state dict (.pt / .pth; also under "state_dict" or "model",
    with or without DDP's "module." prefix) as an ImageNet-normalised classifier in eval mode."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path} is not a readable torch state dict ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "fc.weight" not in {k.removeprefix("module.") for k in state}:
        raise CheckpointError(f"{path} is not a torchvision ResNet-18 state dict (no fc.weight)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = TorchvisionResNet18(state["conv1.weight"].shape[1], state["fc.weight"].shape[0], 224,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    expected = {k for k in model.state_dict() if k not in ("mean", "std")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} is not a torchvision ResNet-18 state dict: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    try:
        model.load_state_dict({**state, "mean": model.mean, "std": model.std})
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the tensors do not fit a ResNet-18 ({str(exc).splitlines()[1].strip()})") from None
    return model.to(device).eval()
