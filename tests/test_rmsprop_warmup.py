"""RMSpropWarmup (Akiba et al. 2017): RMSprop at the start, momentum SGD after the transition; schedule; contract."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup, sgd_mixing
from tests import optim_harness as harness


def test_sgd_mixing_is_continuous_and_bounded():
    """a_sgd: 0.5 e^-4 at epoch 0, 1/2 at the center, 1 from center + period/2; continuous, monotone, <= 1."""
    assert sgd_mixing(0.0) == pytest.approx(0.5 * math.exp(-4))
    assert sgd_mixing(10.0) == 0.5 and sgd_mixing(12.5) == 1.0 and sgd_mixing(40.0) == 1.0
    for join in (10.0, 12.5):
        assert sgd_mixing(join - 1e-9) == pytest.approx(sgd_mixing(join), abs=1e-8)
    grid = [0.01 * i for i in range(2000)]
    values = [sgd_mixing(e) for e in grid]
    assert all(0 < v <= 1 for v in values)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    # the printed slope-2 middle branch would overshoot: 0.5 + 2 * (12.4 - 10) / 5 = 1.46
    assert sgd_mixing(12.4) == pytest.approx(0.5 + 2.4 / 5)


def _grad_sequence(steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return weights, grads


def _run(make_opt, weights, grad_seq, epoch=None):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = make_opt(params)
    for grads in grad_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if epoch is not None:
            opt.set_fractional_epoch(epoch)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_warmup_at_epoch_zero_is_rmsprop_plus_sgd_mix(foreach):
    """At epoch 0 the step is RMSprop(lr=(1-a) lr_rms) + momentum SGD(lr=a lr), a = a_sgd(0), summed."""
    weights, grad_seq = _grad_sequence()
    lr, lr_rms, a = 0.4, 3e-3, sgd_mixing(0.0)
    hybrid = _run(lambda ps: RMSpropWarmup(ps, lr=lr, lr_rmsprop=lr_rms, momentum=0.9, alpha=0.99, eps=1e-8,
                                           foreach=foreach), weights, grad_seq, epoch=0.0)
    rms = _run(lambda ps: torch.optim.RMSprop(ps, lr=(1 - a) * lr_rms, alpha=0.99, eps=1e-8, momentum=0.9),
               weights, grad_seq)
    sgd = _run(lambda ps: torch.optim.SGD(ps, lr=a * lr, momentum=0.9), weights, grad_seq)
    for h, r, s, w in zip(hybrid, rms, sgd, weights, strict=True):
        torch.testing.assert_close(h, w + (r - w) + (s - w))
    # without the SGD share (a_sgd -> 0 far before the center) it is plain torch RMSprop with momentum
    pure = _run(lambda ps: RMSpropWarmup(ps, lr=lr, lr_rmsprop=lr_rms, beta_center=1e4, foreach=foreach),
                weights, grad_seq, epoch=0.0)
    ref = _run(lambda ps: torch.optim.RMSprop(ps, lr=lr_rms, alpha=0.99, eps=1e-8, momentum=0.9), weights, grad_seq)
    for h, r in zip(pure, ref, strict=True):
        torch.testing.assert_close(h, r)


@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_warmup_after_transition_is_momentum_sgd(foreach):
    """From epoch center + period/2 on it is torch.optim.SGD (momentum, weight decay) and RMS stats stay 0."""
    m1, m2 = harness.tiny_model(), harness.tiny_model()
    opt = RMSpropWarmup(m1.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2, steps_per_epoch=1,
                        beta_center=2.0, beta_period=2.0, foreach=foreach)
    opt.steps_taken = 3  # epoch 3 >= 2 + 1
    sgd = torch.optim.SGD(m2.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    harness.train(m1, opt, range(5))
    harness.train(m2, sgd, range(5))
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert all(torch.count_nonzero(s["square_avg"]) == 0 for s in opt.state.values())


def test_rmsprop_warmup_steps_per_epoch_drives_the_schedule():
    """With steps_per_epoch the mixing at step n is a_sgd(n / steps_per_epoch), saved across state_dict."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = RMSpropWarmup([p], lr=0.1, steps_per_epoch=4, beta_center=1.0, beta_period=1.0)
    seen = []
    for _ in range(7):
        seen.append(opt.sgd_mixing())
        p.grad = torch.ones(2)
        opt.step()
    assert seen == [sgd_mixing(n / 4, 1.0, 1.0) for n in range(7)]
    restored = RMSpropWarmup([torch.nn.Parameter(torch.ones(2))], lr=0.1, steps_per_epoch=4, beta_center=1.0,
                             beta_period=1.0)
    restored.load_state_dict(opt.state_dict())
    assert restored.steps_taken == 7 and restored.current_epoch() == 7 / 4


@pytest.mark.parametrize("epoch", [0.0, 11.0, 13.0])
def test_rmsprop_warmup_foreach_equals_single_tensor(epoch):
    """The torch._foreach_* path equals the per-tensor loop in the RMS, mixed and SGD phases."""
    harness.check_foreach_equals_loop(lambda ps, **kw: _at_epoch(RMSpropWarmup(ps, **kw), epoch), lr=0.2,
                                      weight_decay=1e-3)


def _at_epoch(opt: RMSpropWarmup, epoch: float) -> RMSpropWarmup:
    opt.register_step_pre_hook(lambda o, args, kwargs: o.set_fractional_epoch(epoch))
    return opt


def test_rmsprop_warmup_zero_lr_step_stays_finite():
    """lr = 0 (a warmup schedule's first step) leaves out the undefined RMS term: nothing NaN, nothing moves."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSpropWarmup([p], lr=0.0, steps_per_epoch=10)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_rmsprop_warmup_needs_an_epoch_source():
    """Without steps_per_epoch or the callback the first step says how to fix it."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = RMSpropWarmup([p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="steps_per_epoch=.*FractionalEpoch"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("foreach", "epoch"), [(False, 0.0), (True, 0.0), (True, 20.0)])
def test_rmsprop_warmup_nonfinite_gradient_skips_the_step(bad, foreach, epoch):
    """A NaN/Inf gradient skips the whole step (weights and averages), counted, in both phases; then as if dropped."""
    factory = lambda ps: _at_epoch(RMSpropWarmup(ps, lr=0.1, weight_decay=1e-3, foreach=foreach), epoch)  # noqa: E731
    harness.check_nonfinite_gradient_skips_the_step(factory, bad)
    harness.check_skip_request(factory)


def test_rmsprop_warmup_contract():
    """Closure once under grad, closure=None, exact resume from state_dict, sparse gradients rejected."""
    factory = lambda ps: RMSpropWarmup(ps, lr=0.1, steps_per_epoch=2, beta_center=1.0, beta_period=2.0)  # noqa: E731
    harness.check_closure_runs_once_with_grad(factory)
    harness.check_resume_continues_exactly(factory)
    harness.check_sparse_gradient_rejected(factory, "RMSpropWarmup")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=-0.1), "Invalid lr"),
    (dict(lr_rmsprop=-1e-4), "Invalid lr_rmsprop"),
    (dict(momentum=1.0), "Invalid momentum"),
    (dict(alpha=1.5), "Invalid alpha"),
    (dict(eps=0.0), "Invalid eps"),
    (dict(weight_decay=-1.0), "Invalid weight_decay"),
    (dict(beta_period=0.0), "Invalid beta_period"),
    (dict(steps_per_epoch=0), "Invalid steps_per_epoch"),
])
def test_rmsprop_warmup_rejects_bad_hyperparameters(kwargs, match):
    """Bad hyperparameters fail at construction, naming the argument."""
    with pytest.raises(ValueError, match=match):
        RMSpropWarmup([torch.nn.Parameter(torch.ones(2))], **kwargs)
