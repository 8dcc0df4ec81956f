"""One harness for lightning_lbo's optimizers (LARS, LAMB, RMSpropWarmup): contract checks every one must pass."""

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
    opt = factory(list(model.parameters()))
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
    ref = factory(list(ref_model.parameters()))
    train(ref_model, ref, range(steps))

    model = tiny_model()
    opt = factory(list(model.parameters()))
    train(model, opt, range(steps // 2))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    resumed_model = tiny_model()
    resumed_model.load_state_dict(saved_model)
    resumed = factory(list(resumed_model.parameters()))
    resumed.load_state_dict(saved_opt)
    train(resumed_model, resumed, range(steps // 2, steps))
    for a, b in zip(ref_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def check_nonfinite_gradient_skips_that_tensor(factory: OptimizerFactory, bad: float) -> None:
    model = tiny_model()
    opt = factory(list(model.parameters()))
    train(model, opt, range(2))  # state exists
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    tiny_loss(model, 5).backward()
    params[0].grad[0, 0] = bad
    finite_grads = [p.grad.clone() for p in params[1:]]
    opt.step()
    for p, g in zip(params[1:], finite_grads, strict=True):
        assert torch.equal(p.grad, g), "finite gradients must be left bit-identical"
    assert torch.equal(params[0], before[0]), "the tensor with a non-finite gradient must not move"
    for key, value in opt.state[params[0]].items():
        if key != "nonfinite_skips" and torch.is_tensor(value):
            assert torch.equal(value, state_before[0][key]), f"state {key!r} changed on a skipped step"
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert not torch.equal(params[-1], before[-1]), "the other tensors still update"
    assert opt.state[params[0]]["nonfinite_skips"].item() == 1
    assert opt.nonfinite_skips().item() == 1


def check_sparse_gradient_rejected(factory: OptimizerFactory, name: str) -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = factory(list(emb.parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{name} does not support sparse gradients"):
        opt.step()


def check_foreach_equals_loop(factory: Callable[..., torch.optim.Optimizer], steps: int = 5, **kwargs) -> None:
    models = [tiny_model(), tiny_model()]
    opts = [factory(list(m.parameters()), foreach=fe, **kwargs) for m, fe in zip(models, (False, True), strict=True)]
    for m, o in zip(models, opts, strict=True):
        train(m, o, range(steps))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
