"""The Gram of the statistics: block-triangular product and mirror equal the full product (fp64 reference)."""

from __future__ import annotations

import pytest
import torch

from lightning_lbo.optim.kfac.blocks import GRAM_BLOCK, _gram, _gram_with_ones


@pytest.mark.parametrize("d", [2 * GRAM_BLOCK - 1, 2 * GRAM_BLOCK, 301, 8 * GRAM_BLOCK + 5, 1100])
def test_kfac_gram_block_triangle_equals_full_product(d):
    """Widths below, at and above two blocks (a ragged last block, more than 8 blocks): x^T x to fp32 rounding."""
    x = torch.randn(2, 150, d, generator=torch.Generator().manual_seed(d))
    want = torch.einsum("gri,grj->gij", x.double(), x.double())
    got = _gram(x, torch.float32)
    assert got.shape == (2, d, d) and got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    assert torch.equal(got[:, GRAM_BLOCK:, :GRAM_BLOCK], got[:, :GRAM_BLOCK, GRAM_BLOCK:].transpose(1, 2))
    ones = _gram_with_ones(x, torch.float64)
    x1 = torch.cat([x.double(), torch.ones(2, 150, 1, dtype=torch.float64)], 2)
    torch.testing.assert_close(ones, x1.transpose(1, 2) @ x1, rtol=1e-12, atol=1e-9)
