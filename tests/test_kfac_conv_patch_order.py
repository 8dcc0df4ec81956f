"""The conv A statistic from patch-order im2col (rows or Gram reordered) equals the unfold brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac.blocks import Conv2dBlock


@pytest.mark.parametrize("batch", [1, 16])  # 9 rows < d_A (rows reordered, kept) and 144 rows >= d_A (Gram reordered)
@pytest.mark.parametrize(("groups", "bias"), [(1, True), (1, False), (2, True)])
def test_kfac_conv_patch_order_a_equals_unfold(batch, groups, bias):
    """A = sum of [patch, 1][patch, 1]^T over examples and locations, columns in weight.view(C_out, -1) order."""
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups, bias=bias).double()
    x = torch.randn(batch, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    block = Conv2dBlock(conv, "conv", factor_dtype=torch.float64)
    stats, rows = block.input_statistics(x, {"A"})
    patches = F.unfold(x, 3, padding=1, stride=2)  # [N, C * 9, L], columns (c, i, j)
    per_group = patches.shape[1] // groups
    for k in range(groups):
        p = patches[:, k * per_group:(k + 1) * per_group].transpose(1, 2).reshape(-1, per_group)
        if bias:
            p = torch.cat([p, torch.ones(p.shape[0], 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(stats["A"][k], p.T @ p, rtol=1e-12, atol=1e-12)
        if rows is not None:  # kept for the low-rank inverse: weight order too
            torch.testing.assert_close(block.with_ones(rows)[k], p, rtol=0, atol=0)
    assert (rows is not None) == (9 * batch < block.dims[0] - bias)
