"""Resume is bit-identical for any factor/inverse intervals, across low-rank (Woodbury) inversions too (issue 26.7)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 64 inputs and batches of 8 rows: the first layer's A has fewer rows than half of d_A (the Woodbury inverse)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 64, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("low_rank", [True, False])
@pytest.mark.parametrize(("factor_every", "inverse_every"), [(3, 2), (2, 3), (3, 5)])
@pytest.mark.parametrize("stop", [2, 3, 4, 5])
def test_kfac_resume_bit_identical_when_intervals_do_not_divide(low_rank, factor_every, inverse_every, stop):
    kwargs = dict(lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=factor_every,
                  inverse_update_interval=inverse_every, low_rank_inverse=low_rank)
    batches = _batches(12)
    model = _model()
    opt = KFAC(model, **kwargs)
    _run(model, opt, batches[:stop])
    method = type(opt.preconditioner.inverse(model[0])).__name__
    assert (method == "WoodburyKronecker") == low_rank  # the low-rank path ran (or not)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _run(model, opt, batches[stop:])

    resumed = _model()
    resumed.load_state_dict(weights)
    opt2 = KFAC(resumed, **kwargs)
    opt2.load_state_dict(state)
    _run(resumed, opt2, batches[stop:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), (p - q).abs().max()
