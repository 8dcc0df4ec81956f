"""Poisoned KFAC checkpoints are refused at load (issue 26.5, KFAC part): momentum buffers, refresh schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC
from lightning_lbo.optim.kfac.stale import StaleStatistics


def _trained(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=3, inverse_update_interval=3,
               **kwargs)
    for _ in range(4):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _fresh(**kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=3,
                       inverse_update_interval=3, **kwargs)


def test_kfac_load_nan_momentum_buffer_raises():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["state"][2]["momentum_buffer"][0, 0] = float("nan")
    model, other = _fresh()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"momentum buffer of parameter 2.*not finite"):
        other.load_state_dict(state)
    # nothing loaded: the optimizer still has its own (empty) state and K-FAC schedule
    after = other.state_dict()["state"]  # per-parameter entries hold tensors (K-FAC's kfac.* curvature slots)
    assert after.keys() == before["state"].keys()
    for i, entries in after.items():
        assert entries.keys() == before["state"][i].keys()
        for key, value in entries.items():
            old = before["state"][i][key]
            assert torch.equal(value, old) if torch.is_tensor(value) else value == old, (i, key)
    assert other.preconditioner.steps == 0


def test_kfac_load_inf_momentum_buffer_raises_before_bind():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["momentum_buffer"].fill_(float("inf"))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    unbound = KFAC(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum buffer of parameter 0"):
        unbound.load_state_dict(state)


def test_kfac_load_far_next_due_raises():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["kfac"]["blocks"][1]["next_due"]["G"] = 10**9
    _, other = _fresh()
    with pytest.raises(ValueError, match=r"layer '2', statistic 'G' has next_due 1000000000.*not refresh"):
        other.load_state_dict(state)
    state["kfac"]["blocks"][1]["next_due"]["G"] = 1e9  # a float, as a hand-edited checkpoint would hold
    with pytest.raises(ValueError, match=r"next_due 1000000000.0"):
        other.load_state_dict(state)


def test_kfac_load_bad_interval_raises():
    _, opt = _trained()
    for bad in (0, -3, 2.5, True):
        state = copy.deepcopy(opt.state_dict())
        state["kfac"]["blocks"][0]["interval"]["A"] = bad
        _, other = _fresh()
        with pytest.raises(ValueError, match=r"layer '0', statistic 'A' has interval .*positive int"):
            other.load_state_dict(state)


def test_kfac_load_interval_beyond_stale_max_raises():
    policy = StaleStatistics(max_interval=8)
    _, opt = _trained(stale_statistics=policy)
    state = copy.deepcopy(opt.state_dict())
    steps = state["kfac"]["steps"]
    state["kfac"]["blocks"][0]["interval"]["G"] = 50
    state["kfac"]["blocks"][0]["next_due"]["G"] = steps + 50
    _, other = _fresh(stale_statistics=policy)
    with pytest.raises(ValueError, match=r"interval 50 > stale_statistics.max_interval=8"):
        other.load_state_dict(state)


def test_kfac_load_valid_checkpoint_still_resumes_bit_identically():
    """The checks accept what a run writes: a resumed run continues exactly like the original."""
    model, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    other_model, other = _fresh()
    other_model.load_state_dict(weights)
    other.load_state_dict(state)
    torch.manual_seed(5)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    for m, o in ((model, opt), (other_model, other)):
        for x, y in batches:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(p, q)
