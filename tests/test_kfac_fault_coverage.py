"""K-FAC reports the layers it really preconditions and spends no work on others (issue 26.9)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC


def _steps(model, opt, x, n=3) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_kfac_frozen_weight_with_trainable_bias_is_not_a_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"K-FAC preconditions 1 layer; .*0 \(Linear, frozen weight\)"):
        opt = KFAC(model, lr=0.1, factor_update_interval=1, inverse_update_interval=1)
    with pytest.raises(KeyError, match="not a layer K-FAC preconditions"):
        opt.preconditioner.block(model[0])
    bias = model[0].bias.detach().clone()
    _steps(model, opt, torch.randn(8, 4))
    assert not torch.equal(bias, model[0].bias)  # the bias still trains (plain momentum SGD)
    assert opt.preconditioner.inverse(model[2]) is not None


def test_kfac_frozen_bias_with_trainable_weight_is_not_a_block():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].bias.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"K-FAC preconditions 1 layer; .*2 \(Linear, frozen bias\)"):
        opt = KFAC(model, lr=0.1)
    with pytest.raises(KeyError):
        opt.preconditioner.block(model[2])


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = x[..., :8], x[..., 8:]
        return self.head(self.attn(q, kv, kv, need_weights=False)[0])


def test_kfac_attention_with_kdim_counts_no_out_proj_block():
    torch.manual_seed(0)
    model = _CrossAttention()
    with pytest.warns(UserWarning, match=r"K-FAC preconditions 1 layer; .*attn \(MultiheadAttention\), "
                                         r"attn.out_proj \(NonDynamicallyQuantizableLinear, used by its "
                                         r"MultiheadAttention without a forward call\)"):
        opt = KFAC(model, lr=0.1, factor_update_interval=1, inverse_update_interval=1)
    with pytest.raises(KeyError):
        opt.preconditioner.block(model.attn.out_proj)
    _steps(model, opt, torch.randn(4, 5, 14))
    # every layer K-FAC counts is captured and inverted
    assert opt.preconditioner.inverse(model.head) is not None
    assert len(opt.preconditioner.factors(model.head)) == 2


def test_kfac_excluded_attention_takes_its_out_proj_along():
    model = _CrossAttention()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unsupported: no warning at all
        opt = KFAC(model, lr=0.1, exclude=[nn.MultiheadAttention])
    with pytest.raises(KeyError):
        opt.preconditioner.block(model.attn.out_proj)
