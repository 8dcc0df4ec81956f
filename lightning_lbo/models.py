"""Reference networks for examples, tests and benchmarks (pure torch).

* :class:`SmallCNN`: three conv-BN-ReLU stages and a global-average-pooled linear head; small
  Kronecker factors (the largest is 577x577), so K-FAC inverses are cheap.
* :class:`ResNet`: the CIFAR-style ResNet of He et al. (3 stages, depth 6n+2) for 28x28 or
  32x32 inputs. Blocks follow torchvision's naming (``conv1, bn1, conv2, bn2, downsample``), so
  code written for torchvision ResNets (zero-gamma init of ``bn2``) applies unchanged.
* :class:`MLP`: fully connected, optional BatchNorm; without BN it is the model whose
  distributed results can be compared exactly across world sizes.

All take ``[N, C, H, W]`` images and return ``[N, num_classes]`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 (max-pool after the first two), global average pool, linear head.

    Args:
        in_channels: image channels.
        num_classes: number of logits.
        channels: widths of the three conv stages.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"Invalid channels: {channels!r}; give three positive widths.")
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1), nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2), nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut; torchvision's names."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) for 28x28 and 32x32 images.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110).
        width: channels of the first stage (doubled at each of the two later stages).
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
        num_classes: number of logits.
    """

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Invalid depth: {depth}; a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110).")
        if width < 1:
            raise ValueError(f"Invalid width: {width}; use a positive channel count.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(c_in, c_out, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLP(nn.Module):
    """Flatten, then ``Linear-[BN]-ReLU`` per hidden width, then a linear head.

    Args:
        in_features: flattened input size (784 for 28x28 grey images).
        num_classes: number of logits.
        hidden: hidden widths.
        batch_norm: add ``BatchNorm1d`` after each hidden linear layer.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: Sequence[int] = (256, 128),
                 batch_norm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or min(hidden, default=1) < 1:
            raise ValueError(f"Invalid sizes: in_features={in_features}, hidden={hidden!r}; use positive widths.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"cnn": SmallCNN, "resnet": ResNet, "mlp": MLP}


def build_model(name: str, **kwargs) -> nn.Module:
    """A reference network by name: ``"cnn"``, ``"resnet"`` or ``"mlp"``."""
    if name not in MODELS:
        raise ValueError(f"Invalid model: {name!r}. Supported: {tuple(MODELS)}.")
    return MODELS[name](**kwargs)
