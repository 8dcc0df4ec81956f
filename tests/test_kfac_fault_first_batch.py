"""A bad first batch does not leave K-FAC on identity factors (plain SGD) for a whole interval (issue 26.10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC
from lightning_lbo.optim.kfac.stale import StaleStatistics


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("stale", [None, StaleStatistics()])
def test_kfac_bad_first_batch_refreshes_at_next_good_step(stale):
    g = torch.Generator().manual_seed(1)
    good = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    bad_x = good[0][0].clone()
    bad_x[3, 2] = float("nan")
    kwargs = dict(lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=10, inverse_update_interval=10,
                  stale_statistics=stale)

    model = _model()
    opt = KFAC(model, **kwargs)
    _step(model, opt, bad_x, good[0][1])  # non-finite: skipped, nothing changes
    assert int(opt.nonfinite_skips) == 1
    for x, y in good[1:]:
        _step(model, opt, x, y)

    # reference: the same good batches from the start, no bad one (the skipped step changed nothing)
    reference = _model()
    ref_opt = KFAC(reference, **kwargs)
    for x, y in good[1:]:
        _step(reference, ref_opt, x, y)

    # the first good batch's statistics are the factors, as in the reference (not the identity placeholder)
    x1 = torch.cat([good[1][0], torch.ones(16, 1)], dim=1)
    a_first = x1.T @ x1 / 16
    for layer, ref_layer in ((model[0], reference[0]), (model[2], reference[2])):
        assert torch.equal(opt.preconditioner.factors(layer)["A"], ref_opt.preconditioner.factors(ref_layer)["A"])
    torch.testing.assert_close(opt.preconditioner.factors(model[0])["A"].reshape(6, 6).double(), a_first.double(),
                               rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_kfac_bad_first_batch_retry_then_regular_schedule():
    """After the retry the regular interval applies: the next refresh is one interval after the good step."""
    model = _model()
    opt = KFAC(model, lr=0.1, factor_update_interval=5, inverse_update_interval=5)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    bad = x.clone()
    bad[0, 0] = float("inf")
    _step(model, opt, bad, y)
    _step(model, opt, x, y)  # retried here
    pre = opt.preconditioner
    assert all(due == pre.steps - 1 + 5 for block in pre.blocks for due in block.next_due.values())
    before = copy.deepcopy(pre.state_dict())
    _step(model, opt, x, y)  # not a refresh step: nothing captured, schedule unchanged
    assert [b["next_due"] for b in pre.state_dict()["blocks"]] == [b["next_due"] for b in before["blocks"]]


def test_kfac_bad_first_batch_resume_between_skip_and_retry_is_bit_identical():
    g = torch.Generator().manual_seed(2)
    good = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    bad_x = good[0][0].clone()
    bad_x[0, 0] = float("nan")
    kwargs = dict(lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=10, inverse_update_interval=10)
    model = _model()
    opt = KFAC(model, **kwargs)
    _step(model, opt, bad_x, good[0][1])
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in good[1:]:
        _step(model, opt, x, y)
    resumed = _model()
    resumed.load_state_dict(weights)
    opt2 = KFAC(resumed, **kwargs)
    opt2.load_state_dict(state)
    for x, y in good[1:]:
        _step(resumed, opt2, x, y)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
