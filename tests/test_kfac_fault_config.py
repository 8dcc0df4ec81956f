"""K-FAC configurations that used to be accepted silently are refused with the fix named (issue 26.8)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _step(model, opt) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()


def test_kfac_exclude_by_qualified_name():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 6))
    model.add_module("fc", nn.Linear(6, 3))
    pre = KFACPreconditioner(model, exclude=["fc"])
    assert [b.name for b in pre.blocks] == ["body"]


def test_kfac_exclude_unknown_name_raises():
    with pytest.raises(ValueError, match=r"exclude lists \['fc'\], not in Sequential.*qualified names"):
        KFACPreconditioner(_mlp(), exclude=["fc"])


def test_kfac_exclude_module_not_in_model_raises():
    with pytest.raises(ValueError, match=r"Linear \(a module not in the model\)"):
        KFACPreconditioner(_mlp(), exclude=[nn.Linear(6, 3)])


def test_kfac_exclude_wrong_type_raises():
    with pytest.raises(TypeError, match=r"Invalid exclude entry 3.*qualified module names"):
        KFACPreconditioner(_mlp(), exclude=[3])


@pytest.mark.parametrize("damping", [math.inf, -1.0, 0.0, math.nan])
def test_kfac_damping_not_positive_finite_raises(damping):
    with pytest.raises(ValueError, match=r"Invalid damping.*positive finite"):
        KFAC(_mlp(), lr=0.1, damping=damping)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.inf, math.nan])
def test_kfac_callable_damping_checked_when_resolved(value):
    model = _mlp()
    opt = KFAC(model, lr=0.1, damping=lambda step: value, factor_update_interval=1, inverse_update_interval=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"damping\(0\) returned .*positive finite"):
        _step(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_kfac_callable_damping_later_bad_value_raises():
    model = _mlp()
    opt = KFAC(model, lr=0.1, damping=lambda step: 1e-2 if step < 2 else -1.0)
    _step(model, opt)
    _step(model, opt)
    with pytest.raises(ValueError, match=r"damping\(2\) returned -1.0"):
        _step(model, opt)


def test_kfac_likelihood_with_empirical_fisher_raises():
    with pytest.raises(ValueError, match=r"likelihood='gaussian' has no effect with fisher='empirical'.*fisher='mc'"):
        KFAC(_mlp(), lr=0.1, likelihood="gaussian")
    KFAC(_mlp(), lr=0.1, fisher="mc", likelihood="gaussian")  # accepted where it applies


@pytest.mark.parametrize("name", ["factor_update_interval", "inverse_update_interval"])
def test_kfac_bool_interval_raises(name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: True; use a positive int"):
        KFAC(_mlp(), lr=0.1, **{name: True})


def test_kfac_kl_clip_with_different_group_lrs_raises():
    model = _mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}]
    with pytest.raises(ValueError, match=r"kl_clip with parameter groups of different learning rates.*kl_clip=None"):
        KFAC(groups, lr=0.1)
    KFAC([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}],
         lr=0.1, kl_clip=None)  # no clip: each group's lr applies as given
