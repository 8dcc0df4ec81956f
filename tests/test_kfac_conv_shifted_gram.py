"""The conv A statistic built from shifted inputs (no im2col rows) equals the unfold brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac.blocks import Conv1dBlock, Conv2dBlock
from lightning_lbo.optim.kfac.blocks import conv as conv_blocks


def _unfold_a(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """sum over examples and locations of [patch, 1][patch, 1]^T, columns in weight.view(C_out, -1) order."""
    padded = x
    if conv.padding_mode != "zeros":
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    else:
        if conv.padding == "same":
            th, tw = (conv.dilation[i] * (conv.kernel_size[i] - 1) for i in range(2))
            padded = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            padding = 0
        else:
            padding = conv.padding
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride, padding=padding)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows.T @ rows


def test_kfac_conv_shifted_gram_is_used_for_resnet_layer1():
    """A 3x3 conv on an 8x8 input with 16+ channels (resnet18 layer1 at 32x32) takes the shifted-input path, and
    its A is the brute-force one."""
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False).double()
    x = torch.randn(8, 16, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block = Conv2dBlock(conv, "conv", factor_dtype=torch.float64)
    assert block._shifts(x) is not None
    stats, rows = block.input_statistics(x, {"A"})
    assert rows is None
    torch.testing.assert_close(stats["A"][0], _unfold_a(conv, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [
    (3, 1, 1, 1), (3, 2, 1, 1), ((2, 3), (1, 2), (1, 0), 1), (3, 1, 2, 2), (5, 1, "same", 1), (1, 2, 0, 1),
    (3, 1, 0, 1), (3, 1, 4, 1),  # (3, 1, 4): padding wider than the kernel reaches
])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(7, 6), (2, 2)])
def test_kfac_conv_shifted_gram_equals_unfold(monkeypatch, kernel, stride, padding, dilation, padding_mode, bias,
                                              size):
    """Forced for every geometry (gain 0): strides, dilations, asymmetric kernels and padding, 'same', reflect,
    inputs smaller than the kernel's reach (offsets whose partners are all padding), with and without bias."""
    if padding_mode == "reflect" and (padding == 4 or (padding == 2 and min(size) <= 2)):
        pytest.skip("geometry torch refuses (reflect padding must be narrower than the input): no conv to compare")
    conv = nn.Conv2d(16, 4, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode,
                     bias=bias).double()
    x = torch.randn(48, 16, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        conv(x)
    except RuntimeError:
        pytest.skip("geometry torch refuses (the input is smaller than the dilated kernel): no conv to compare")
    block = Conv2dBlock(conv, "conv", factor_dtype=torch.float64)
    monkeypatch.setattr(conv_blocks, "SHIFTED_GRAM_GAIN", 0.0)
    shifts = block._shifts(x)
    if shifts is None:
        pytest.skip("fewer im2col rows than columns: K-FAC keeps the im2col Gram here, the path every other "
                    "conv factor test checks; no shifted Gram to compare")
    torch.testing.assert_close(block._shifted_gram(x, shifts)[0], _unfold_a(conv, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "padding", "padding_mode"), [(3, 1, "zeros"), (4, "same", "zeros"),
                                                                  (3, 1, "circular")])
def test_kfac_conv1d_shifted_gram_equals_unfold(monkeypatch, kernel, padding, padding_mode):
    conv1d = nn.Conv1d(16, 4, kernel, padding=padding, padding_mode=padding_mode).double()
    x = torch.randn(20, 16, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    block = Conv1dBlock(conv1d, "conv", factor_dtype=torch.float64)
    monkeypatch.setattr(conv_blocks, "SHIFTED_GRAM_GAIN", 0.0)
    shifts = block._shifts(x)
    assert shifts is not None
    conv2d = nn.Conv2d(16, 4, (1, kernel), padding=padding if padding == "same" else (0, padding),
                       padding_mode=padding_mode).double()
    conv2d.bias = conv1d.bias
    torch.testing.assert_close(block._shifted_gram(x, shifts)[0], _unfold_a(conv2d, x.unsqueeze(2)), rtol=1e-12,
                               atol=1e-12)


def test_kfac_conv_shifted_gram_fp32_matches_the_rows_gram():
    """In fp32 (the default factor dtype) the two paths agree to fp32 rounding of the sums."""
    conv = nn.Conv2d(32, 8, 3, padding=1)
    x = torch.randn(16, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    block = Conv2dBlock(conv, "conv")
    shifts = block._shifts(x)
    assert shifts is not None
    want = _unfold_a(conv.double(), x.double()).float()
    torch.testing.assert_close(block.input_statistics(x, {"A"})[0]["A"][0], want, rtol=1e-5, atol=1e-4)
