"""One harness for lightning_lbo's optimizers (LARS, LAMB, RMSpropWarmup, KFAC): contract checks every one must pass.

An optimizer with a ``bind(module)`` method (KFAC built from parameters) is bound to the model it was built for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def tiny_model() -> nn.Module:
    """Linear + BatchNorm + Linear: matrices, vectors and a bias, enough for per-tensor logic."""
    torch.manual_seed(0)
    # no bias before BN: its gradient is rounding noise, which Adam-type updates would amplify
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


def build(factory: Callable[..., torch.optim.Optimizer], model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """``factory(model's parameters, **kwargs)``, bound to ``model`` if the optimizer binds (KFAC's hooks)."""
    opt = factory(list(model.parameters()), **kwargs)
    if callable(getattr(opt, "bind", None)):
        opt.bind(model)
    return opt


def tiny_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 5, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        tiny_loss(model, t).backward()
        opt.step()


def check_closure_runs_once_with_grad(factory: OptimizerFactory) -> None:
    model = tiny_model()
    opt = build(factory, model)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = tiny_loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss)
    assert opt.step() is None  # closure=None reuses the gradients


def check_resume_continues_exactly(factory: OptimizerFactory, steps: int = 6) -> None:
    ref_model = tiny_model()
    ref = build(factory, ref_model)
    train(ref_model, ref, range(steps))

    model = tiny_model()
    opt = build(factory, model)
    train(model, opt, range(steps // 2))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    resumed_model = tiny_model()
    resumed_model.load_state_dict(saved_model)
    resumed = build(factory, resumed_model)
    resumed.load_state_dict(saved_opt)
    train(resumed_model, resumed, range(steps // 2, steps))
    for a, b in zip(ref_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same_state(a: dict, b: dict, schedule_keys: tuple[str, ...] = ()) -> None:
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key, value in a["state"][i].items():
            if str(key).startswith(schedule_keys):
                continue
            if torch.is_tensor(value):
                assert torch.equal(value, b["state"][i][key]), f"state {key!r} of parameter {i} differs"
            else:
                assert value == b["state"][i][key], f"state {key!r} of parameter {i} differs"


def check_nonfinite_gradient_skips_the_step(factory: OptimizerFactory, bad: float, grads_kept: bool = True,
                                            schedule_keys: tuple[str, ...] = ()) -> None:
    """One NaN/Inf gradient entry skips the whole step; training then continues as if the batch never came.

    ``grads_kept=False`` for an optimizer that writes its preconditioned gradient into ``.grad`` (KFAC: its
    preconditioner runs before the step is known to be skipped, and masking it would cost a pass per step).
    ``schedule_keys``: per-parameter state entries that are a refresh schedule, which a skipped step advances
    (K-FAC's ``kfac.next_due.*`` and ``kfac.refreshes.*``, the refresh attempts: its step clock counts skipped
    steps); every other entry must be unchanged.
    """
    model = tiny_model()
    opt = build(factory, model)
    train(model, opt, range(2))  # state exists
    params = list(model.parameters())
    before, state_before = _snapshot(model, opt)
    opt.zero_grad()
    tiny_loss(model, 5).backward()
    params[0].grad[0, 0] = bad
    finite_grads = [p.grad.clone() for p in params[1:]]
    opt.step()
    for p, g in zip(params[1:], finite_grads, strict=True):
        assert torch.equal(p.grad, g) or not grads_kept, "finite gradients must be left bit-identical"
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b), "no weight may move on a skipped step"
    _assert_same_state(opt.state_dict(), state_before, schedule_keys)
    assert opt.nonfinite_skips.dtype == torch.int64 and opt.nonfinite_skips.shape == ()
    assert opt.nonfinite_skips.item() == 1 and opt.state_dict()["nonfinite_skips"].item() == 1

    # afterwards the run equals, bit for bit, the run in which the bad batch was dropped
    train(model, opt, range(6, 8))
    ref_model = tiny_model()
    ref = build(factory, ref_model)
    train(ref_model, ref, [0, 1, 6, 7])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ref.nonfinite_skips.item() == 0


def check_skip_request(factory: OptimizerFactory, schedule_keys: tuple[str, ...] = ()) -> None:
    """``skip_next_step_where(True)`` skips one step with finite gradients; the request is consumed
    (``schedule_keys``: see :func:`check_nonfinite_gradient_skips_the_step`)."""
    model = tiny_model()
    opt = build(factory, model)
    train(model, opt, range(2))
    before, state_before = _snapshot(model, opt)
    opt.zero_grad()
    tiny_loss(model, 2).backward()
    opt.skip_next_step_where(torch.tensor(True))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    _assert_same_state(opt.state_dict(), state_before, schedule_keys)
    assert opt.nonfinite_skips.item() == 1
    opt.skip_next_step_where(torch.tensor(False))
    opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.step()  # the request was consumed
    assert opt.nonfinite_skips.item() == 1
    with pytest.raises(TypeError, match="one-element bool tensor"):
        opt.skip_next_step_where(True)


def check_sparse_gradient_rejected(factory: OptimizerFactory, name: str) -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = build(factory, emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{name} does not support sparse gradients"):
        opt.step()


def check_foreach_equals_loop(factory: Callable[..., torch.optim.Optimizer], steps: int = 5, **kwargs) -> None:
    models = [tiny_model(), tiny_model()]
    opts = [build(factory, m, foreach=fe, **kwargs) for m, fe in zip(models, (False, True), strict=True)]
    for m, o in zip(models, opts, strict=True):
        train(m, o, range(steps))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
