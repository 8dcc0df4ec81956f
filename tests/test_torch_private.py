"""Every private torch name the pure-torch core reads goes through lightning_lbo/optim/_torch_private.py; each
accessor is exercised here on a real object, so a torch release that moves a name fails here, naming it."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lbo.optim import _torch_private as private


def test_torch_private_reversed_padding_matches_the_layers_own_padding():
    """The padding the accessor returns, applied with F.pad, gives the conv's own output (circular mode)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 5), padding=(1, 2), padding_mode="circular")
    assert private.reversed_padding(conv) == (2, 2, 1, 1)
    x = torch.randn(1, 2, 6, 7)
    padded = nn.functional.pad(x, private.reversed_padding(conv), mode="circular")
    torch.testing.assert_close(nn.functional.conv2d(padded, conv.weight, conv.bias), conv(x))


def test_torch_private_qkv_same_embed_dim():
    assert private.qkv_same_embed_dim(nn.MultiheadAttention(8, 2)) is True
    assert private.qkv_same_embed_dim(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)) is False


def test_torch_private_grad_scaler_scale_is_the_device_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7)
    scaler.scale(torch.ones(()))  # creates the scale tensor lazily
    scale = private.grad_scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == 2.0 ** 7 == scaler.get_scale()
