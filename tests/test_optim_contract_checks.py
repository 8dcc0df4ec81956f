"""LARS, LAMB, RMSpropWarmup: no host sync per step, checkpoints refused when poisoned, clear errors for misuse.

* A step makes no ``.item()`` (``aten._local_scalar_dense``), builds no tensor from host data and copies
  nothing between devices (counted under a ``TorchDispatchMode``), on every path (foreach, fused, loop),
  with and without a skip request.
* ``load_state_dict`` refuses a NaN/Inf in any state tensor and a negative or fractional count, naming
  the entry, and leaves the optimizer as it was.
* ``LAMB(eps=0)`` is refused (0/(sqrt(0)+0) on a weight whose gradient is 0); ``LARS(module)`` names
  ``module.parameters()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup

aten = torch.ops.aten


class HostSyncCounter(TorchDispatchMode):
    """Ops that wait for the device or move data between host and device: ``.item()`` and friends
    (``_local_scalar_dense``), tensors built from host data (``lift_fresh``), cross-device copies."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.lift_fresh.default, aten.lift_fresh_copy.default):
            self.ops.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst) != src.device:
                self.ops.append(f"{func} {src.device}->{dst}")
        return func(*args, **kwargs)


FACTORIES = {
    "lars_foreach": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, foreach=True),
    "lars_loop_paper_nesterov": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, momentum_form="paper", nesterov=True,
                                                foreach=False),
    "lars_rescale": lambda ps: LARS(ps, lr=0.1, momentum=0.3, weight_decay=1e-4),  # folds the scale every 5 steps
    "lamb_fused": lambda ps: LAMB(ps, lr=1e-3, weight_decay=0.01, fused=True),
    "lamb_foreach": lambda ps: LAMB(ps, lr=1e-3, weight_decay=0.01, fused=False),
    "lamb_loop": lambda ps: LAMB(ps, lr=1e-3, weight_decay=0.01, foreach=False),
    "rmsprop_warmup_foreach": lambda ps: RMSpropWarmup(ps, lr=0.1, weight_decay=1e-4, steps_per_epoch=2,
                                                       beta_center=1.0, beta_period=2.0),
    "rmsprop_warmup_loop": lambda ps: RMSpropWarmup(ps, lr=0.1, steps_per_epoch=2, beta_center=1.0, beta_period=2.0,
                                                    foreach=False),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def _train(model, opt, steps) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 4, generator=gen)), torch.randint(0, 3, (8,), generator=gen)).backward()
        opt.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_optim_step_makes_no_host_sync(name):
    """Steps 2..9 (state exists; the RMSpropWarmup runs cross its transition, LARS folds its scales) with a skip
    request on one of them: no host sync, no host-built tensor, no cross-device copy."""
    model = _model()
    opt = FACTORIES[name](list(model.parameters()))
    _train(model, opt, range(1))
    request = torch.tensor(True)  # built outside the counted region, as a callback's device flag would be
    for step in range(1, 9):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with HostSyncCounter() as counter:
            if step == 4:
                opt.skip_next_step_where(request)
            opt.step()
        assert counter.ops == [], f"{name} step {step}: {counter.ops}"
    assert opt.nonfinite_skips.item() == 1


def _trained(name: str):
    model = _model()
    opt = FACTORIES[name](list(model.parameters()))
    _train(model, opt, range(3))
    return model, opt


POISON = [
    ("lars_foreach", lambda sd: sd["state"][0]["scaled_momentum_buffer"].view(-1).__setitem__(1, float("nan")),
     r"state\[0\]\['scaled_momentum_buffer'\] \(shape \(6, 4\)\) holds 1 NaN/Inf"),
    ("lars_foreach", lambda sd: sd["state"][2]["momentum_scale"].fill_(float("inf")),
     r"state\[2\]\['momentum_scale'\] \(shape \(\)\) holds 1 NaN/Inf"),
    ("lars_foreach", lambda sd: sd["state"][1]["momentum_scale"].fill_(0.0), r"state\[1\]\['momentum_scale'\] is 0.0"),
    ("lars_foreach", lambda sd: sd["param_groups"][0].__setitem__("steps_since_rescale", -2),
     r"param_groups\[0\]\['steps_since_rescale'\] is -2"),
    ("lamb_fused", lambda sd: sd["state"][5]["exp_avg"].view(-1).__setitem__(0, float("-inf")),
     r"state\[5\]\['exp_avg'\] \(shape \(3,\)\) holds 1 NaN/Inf"),
    ("lamb_fused", lambda sd: sd["state"][0]["exp_avg_sq"].fill_(float("nan")),
     r"state\[0\]\['exp_avg_sq'\] \(shape \(6, 4\)\) holds 24 NaN/Inf"),
    ("lamb_fused", lambda sd: sd["state"][1]["step"].fill_(-5.0), r"state\[1\]\['step'\] is .*whole number >= 0"),
    ("lamb_fused", lambda sd: sd["state"][1]["step"].fill_(2.5), r"state\[1\]\['step'\] is .*whole number >= 0"),
    ("lamb_fused", lambda sd: sd.__setitem__("nonfinite_skips", torch.tensor(-1)), r"nonfinite_skips is"),
    ("rmsprop_warmup_foreach", lambda sd: sd["state"][2]["velocity"].view(-1).__setitem__(0, float("nan")),
     r"state\[2\]\['velocity'\] \(shape \(6,\)\) holds 1 NaN/Inf"),
    ("rmsprop_warmup_foreach", lambda sd: sd["state"][0]["square_avg"].view(-1).__setitem__(3, float("inf")),
     r"state\[0\]\['square_avg'\]"),
    ("rmsprop_warmup_foreach", lambda sd: sd["rmsprop_warmup"].__setitem__("steps_taken", -1), r"steps_taken is -1"),
    ("rmsprop_warmup_foreach", lambda sd: sd["rmsprop_warmup"].__setitem__("fractional_epoch", float("nan")),
     r"fractional_epoch is nan"),
]


@pytest.mark.parametrize("name, poison, match", POISON)
def test_optim_load_state_dict_refuses_poisoned_checkpoint(name, poison, match):
    """A poisoned entry is refused at load with an error naming it; the optimizer is left as it was."""
    _, source = _trained(name)
    checkpoint = copy.deepcopy(source.state_dict())
    poison(checkpoint)
    model, opt = _trained(name)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(checkpoint)
    after = opt.state_dict()
    for key, state in before["state"].items():
        for entry, value in state.items():
            assert torch.equal(value, after["state"][key][entry]), f"{key}/{entry} changed by a refused load"
    assert before["param_groups"] == after["param_groups"]


@pytest.mark.parametrize("name", ["lars_foreach", "lamb_fused", "rmsprop_warmup_foreach"])
def test_optim_load_state_dict_accepts_a_clean_checkpoint(name):
    """The checks refuse nothing that a run wrote (the round trip continues bit for bit, as the harness checks)."""
    _, source = _trained(name)
    _, opt = _trained(name)
    opt.load_state_dict(copy.deepcopy(source.state_dict()))


def test_lamb_rejects_zero_eps():
    """eps=0 would write NaN into a weight whose gradient is 0 (a dead ReLU unit): refused at construction."""
    with pytest.raises(ValueError, match=r"Invalid eps: 0.*dead ReLU"):
        LAMB([nn.Parameter(torch.ones(2))], eps=0.0)
    opt = LAMB([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid eps"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "eps": 0})


def test_lamb_small_eps_keeps_dead_units_finite():
    """The default eps on a weight column whose gradient is exactly 0 keeps every weight finite."""
    w = nn.Parameter(torch.ones(3, 2))
    opt = LAMB([w], lr=0.1)
    for _ in range(3):
        w.grad = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
        opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("cls", [LARS, LAMB, RMSpropWarmup])
def test_optim_given_a_module_names_module_parameters(cls):
    """Passing the module itself (a common slip, e.g. LARS(self)) says what to pass instead."""
    with pytest.raises(TypeError, match=r"pass module\.parameters\(\)"):
        cls(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"pass module\.parameters\(\)"):
        cls(nn.Linear(2, 2))
