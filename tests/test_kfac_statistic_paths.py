"""The cheaper statistic paths equal the direct ones in fp64: conv ``G`` from per-example products (no row
copy), BatchNorm's ``x_hat`` from the layer's kernel, and low-rank ``G`` rows skipped when they would not pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import KFACPreconditioner
from lightning_lbo.optim.kfac.blocks import Conv1dBlock, Conv2dBlock, LinearBlock, UnitWiseBlock, _gram
from lightning_lbo.optim.kfac.factors import LowRankFactor


def _count_output_rows(block, monkeypatch) -> list[str]:
    """A list that gets the block's name each time its ``output_rows`` builds the rows."""
    calls = []
    original = block.output_rows
    monkeypatch.setattr(block, "output_rows", lambda grad: calls.append(block.name) or original(grad))
    return calls


@pytest.mark.parametrize(("conv", "shape"), [(nn.Conv2d(4, 6, 3, padding=1), (5, 6, 7, 4)),  # 28 >= 4 x 6: per example
                                             (nn.Conv2d(4, 6, 3, groups=2), (5, 6, 4, 4)),  # 16 locations >= 4 x 3
                                             (nn.Conv2d(4, 6, 3, groups=2), (5, 6, 3, 3)),
                                             (nn.Conv2d(4, 6, 1), (3, 6, 1, 1)),
                                             (nn.Conv2d(4, 8, 3), (2, 8, 2, 2)),
                                             (nn.Conv1d(6, 6, 3, groups=3), (5, 6, 9))])
def test_kfac_conv_output_statistic_equals_gram_of_output_rows(conv, shape, monkeypatch):
    """G = sum over examples and locations of g g^T / L, per group: equal to the Gram of output_rows, which
    is built only with fewer than 4 locations per channel of a group (else [N, d_g, d_g] could outgrow the gradient)."""
    block_type = Conv1dBlock if isinstance(conv, nn.Conv1d) else Conv2dBlock
    block = block_type(conv.double(), "conv", factor_dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows, locations = block.output_rows(grad)
    expected = _gram(rows, torch.float64) / locations
    built = _count_output_rows(block, monkeypatch)
    torch.testing.assert_close(block.output_statistic(grad, None), expected, rtol=1e-12, atol=1e-12)
    assert bool(built) == (locations < 4 * shape[1] // conv.groups)
    g, c = conv.groups, shape[1] // conv.groups  # brute force over examples and locations too
    flat = grad.reshape(shape[0], g, c, -1)
    brute = sum(flat[n, :, :, loc].unsqueeze(2) * flat[n, :, :, loc].unsqueeze(1)
                for n in range(shape[0]) for loc in range(flat.shape[-1])) / locations
    torch.testing.assert_close(block.output_statistic(grad, None), brute, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 4, 5), (3, 3, 2, 3, 4)])
def test_kfac_batch_norm_x_hat_equals_batch_statistics_formula(shape):
    """The unit-wise block's context is (x - mean) / sqrt(var + eps) over all dims but the channel (fp64)."""
    norm = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](3, eps=1e-3)
    block = UnitWiseBlock(norm.double(), "bn", factor_dtype=torch.float64)
    x = 3.0 + 2.0 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, x_hat = block.input_statistics(x, set())
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    torch.testing.assert_close(x_hat, (x - mean) / torch.sqrt(var + norm.eps), rtol=1e-12, atol=1e-12)
    assert norm.running_mean.abs().max() == 0  # the layer's running statistics are not touched


@pytest.mark.parametrize(("block", "shape", "low_rank"), [
    (Conv2dBlock(nn.Conv2d(2, 16, 3), "c"), (3, 16, 2, 2), False),  # 12 rows, d_g = 16: kept up to 8
    (Conv2dBlock(nn.Conv2d(2, 16, 3), "c"), (2, 16, 2, 2), True),
    (LinearBlock(nn.Linear(3, 8), "l"), (4, 8), True),
    (LinearBlock(nn.Linear(3, 8), "l"), (5, 8), False),
    (LinearBlock(nn.Linear(3, 8), "l", linear_variant="reduce"), (4, 7, 8), True),  # reduce: one row per example
    (LinearBlock(nn.Linear(3, 8), "l"), (4, 7, 8), False),  # expand: 28 rows
])
def test_kfac_low_rank_output_rows_only_when_they_pay(block, shape, low_rank, monkeypatch):
    """Rows of a low-rank G are built only with fewer than d_g / 2 of them, else None without building them."""
    grad = torch.randn(shape)
    built = _count_output_rows(block, monkeypatch)
    rows = block.low_rank_output_rows(grad)
    assert (rows is not None) == low_rank and bool(built) == low_rank
    if low_rank:
        torch.testing.assert_close(rows.transpose(1, 2) @ rows, block.output_statistic(grad, None))


def test_kfac_refresh_builds_no_output_rows_for_wide_batches(monkeypatch):
    """A refresh of a conv net whose output gradients have many rows never builds them (the Gram reads the
    gradient directly) and still keeps the low-rank rows of a layer with few."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 64))
    pre = KFACPreconditioner(model, kl_clip=None)
    calls = {block.name: _count_output_rows(block, monkeypatch) for block in pre.blocks}
    F.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
    pre.step()
    # the Linear's 8 rows < 64 / 2 feed its low-rank G; the conv's 288 rows are never built
    assert {name for name, built in calls.items() if built} == {"2"}
    assert isinstance(pre.blocks[1].stored["G"], LowRankFactor)
    assert not isinstance(pre.blocks[0].stored["G"], LowRankFactor)
