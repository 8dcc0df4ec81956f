"""Reference models: shapes, parameter counts from closed forms, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lbo.models import MLP, ResNet, SmallCNN, build_model


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_resnet20_shapes_and_parameter_count(size, channels):
    """ResNet-20 maps 28x28 and 32x32 images to logits; its conv weights count 9*(...) as in He et al."""
    model = ResNet(20, in_channels=channels)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    # stem + 3 stages x 3 blocks x 2 convs of 3x3, plus two 1x1 shortcut convs.
    expected = 9 * channels * 16 + 9 * 16 * 16 * 6 + 9 * (16 * 32 + 32 * 32 * 5) + 9 * (32 * 64 + 64 * 64 * 5) \
        + 16 * 32 + 32 * 64
    assert conv == expected


def test_resnet_blocks_use_torchvision_names():
    """Blocks expose bn2 as their last BN (zero-gamma init relies on it) and downsample as Sequential."""
    block = ResNet(20).layer2[0]
    assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.downsample[1], nn.BatchNorm2d)


def test_small_cnn_and_mlp_forward():
    """SmallCNN has BN; MLP without BN has none, with BN one per hidden layer."""
    assert SmallCNN()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in SmallCNN().modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in MLP().modules())
    assert sum(isinstance(m, nn.BatchNorm1d) for m in MLP(hidden=(8, 8), batch_norm=True).modules()) == 2
    assert MLP(hidden=(8,))(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_model_validation_messages():
    """Bad sizes name the argument and the fix."""
    with pytest.raises(ValueError, match="depth 6n\\+2"):
        ResNet(21)
    with pytest.raises(ValueError, match="three positive widths"):
        SmallCNN(channels=(8, 8))
    with pytest.raises(ValueError, match="Supported: \\('cnn', 'resnet', 'mlp'\\)"):
        build_model("vgg")
