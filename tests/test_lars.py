"""LARS against a plain-Python Algorithm 1 (You et al. 2017), against torch.optim.SGD, and the optimizer contract."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lbo.optim.lars import LARS
from tests import optim_harness as harness


def _norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def reference_lars(weights, grad_seq, lrs, *, momentum, weight_decay, eta, eps, paper_form, nesterov=False,
                   clip=False, adapt=True):
    """Algorithm 1 of the LARS paper in plain Python floats, one flat list per layer.

    ``paper_form``: v = m v + lr * lambda * (g + beta w); w -= v.  Otherwise v = m v + lambda * d; w -= lr v.
    """
    w = [list(layer) for layer in weights]
    v = [[0.0] * len(layer) for layer in weights]
    for grads, lr in zip(grad_seq, lrs, strict=True):
        for layer, g in enumerate(grads):
            wl = w[layer]
            wn, gn = _norm(wl), _norm(g)
            if adapt and wn > 0 and gn > 0:
                local = eta * wn / (gn + weight_decay * wn + eps)
                ratio = min(local / lr, 1.0) if clip else local
            else:
                ratio = 1.0
            d = [gi + weight_decay * wi for gi, wi in zip(g, wl, strict=True)]
            scale = lr * ratio if paper_form else ratio
            v[layer] = [momentum * vi + scale * di for vi, di in zip(v[layer], d, strict=True)]
            ahead = [momentum * vi + scale * di for vi, di in zip(v[layer], d, strict=True)]  # Nesterov look-ahead
            step = ahead if nesterov else v[layer]
            if not paper_form:
                step = [lr * si for si in step]
            w[layer] = [wi - si for wi, si in zip(wl, step, strict=True)]
    return w


def _problem(steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return weights, grads


def _run_lars(weights, grad_seq, lrs, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = LARS(params, lr=lrs[0], **kwargs)
    for grads, lr in zip(grad_seq, lrs, strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    return params


POLY_LRS = [2.0 * (1 - t / 4) ** 2 for t in range(4)]  # the paper's poly(2) schedule: the two forms differ


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("paper_form", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_algorithm1_reference(foreach, paper_form, nesterov):
    """Both momentum forms equal the plain-Python Algorithm 1 under a changing (poly) LR."""
    weights, grad_seq = _problem()
    kw = dict(momentum=0.9, weight_decay=5e-3, eta=0.02, eps=1e-9)
    expected = reference_lars([w.flatten().tolist() for w in weights],
                              [[g.flatten().tolist() for g in gs] for gs in grad_seq], POLY_LRS,
                              paper_form=paper_form, nesterov=nesterov, **kw)
    got = _run_lars(weights, grad_seq, POLY_LRS, momentum=0.9, weight_decay=5e-3, trust_coefficient=0.02, eps=1e-9,
                    nesterov=nesterov, momentum_form="paper" if paper_form else "pytorch", foreach=foreach)
    for p, e in zip(got, expected, strict=True):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=torch.float64))


def test_lars_forms_differ_only_when_lr_changes():
    """Paper and PyTorch forms coincide at constant LR and differ under a schedule (momentum correction)."""
    weights, grad_seq = _problem()
    kw = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)
    same = [_run_lars(weights, grad_seq, [1.5] * 4, momentum_form=f, **kw) for f in ("paper", "pytorch")]
    for a, b in zip(*same, strict=True):
        torch.testing.assert_close(a, b)
    diff = [_run_lars(weights, grad_seq, POLY_LRS, momentum_form=f, **kw) for f in ("paper", "pytorch")]
    assert not torch.allclose(diff[0][0], diff[1][0])


@pytest.mark.parametrize("clip_lr", [1e-3, 50.0])
def test_lars_larc_clip_reference(clip_lr):
    """LARC clip: effective LR min(local_lr, lr), for an LR below and above the local LRs."""
    weights, grad_seq = _problem()
    expected = reference_lars([w.flatten().tolist() for w in weights],
                              [[g.flatten().tolist() for g in gs] for gs in grad_seq], [clip_lr] * 4,
                              momentum=0.9, weight_decay=1e-3, eta=0.01, eps=1e-8, paper_form=False, clip=True)
    got = _run_lars(weights, grad_seq, [clip_lr] * 4, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01,
                    clip=True)
    for p, e in zip(got, expected, strict=True):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=torch.float64))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_pytorch_form_equals_sgd_without_adaptation(nesterov, foreach):
    """lars_adapt=False in the PyTorch form is torch.optim.SGD (momentum, weight decay, Nesterov)."""
    m1, m2 = harness.tiny_model(), harness.tiny_model()
    lars = LARS(m1.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, lars_adapt=False,
                foreach=foreach)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, foreach=True)
    harness.train(m1, lars, range(5))
    harness.train(m2, sgd, range(5))
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_lars_group_switches_drive_decay_and_adaptation():
    """A group with weight_decay=0 and lars_adapt=False gets plain momentum SGD; the other group gets LARS."""
    weights, grad_seq = _problem()
    matrix, bias = torch.nn.Parameter(weights[0].clone()), torch.nn.Parameter(weights[1].clone())
    opt = LARS([{"params": [matrix]}, {"params": [bias], "weight_decay": 0.0, "lars_adapt": False}],
               lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01)
    for gs in grad_seq:
        matrix.grad, bias.grad = gs[0].clone(), gs[1].clone()
        opt.step()
    flat = [[g.flatten().tolist() for g in gs] for gs in grad_seq]
    ref_matrix = reference_lars([weights[0].flatten().tolist()], [[g[0]] for g in flat], [0.5] * 4, momentum=0.9,
                                weight_decay=1e-2, eta=0.01, eps=1e-8, paper_form=False)
    ref_bias = reference_lars([weights[1].flatten().tolist()], [[g[1]] for g in flat], [0.5] * 4, momentum=0.9,
                              weight_decay=0.0, eta=0.01, eps=1e-8, paper_form=False, adapt=False)
    torch.testing.assert_close(matrix.detach().flatten(), torch.tensor(ref_matrix[0], dtype=torch.float64))
    torch.testing.assert_close(bias.detach().flatten(), torch.tensor(ref_bias[0], dtype=torch.float64))


def test_lars_zero_weight_or_gradient_gives_ratio_one():
    """||w|| = 0 (fresh zero init) or ||g|| = 0 gives trust ratio 1: the step is lr * g."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=0.5, momentum=0.0, trust_coefficient=1e-3)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 1.0, -0.25]))
    w.grad = torch.zeros(3)
    opt.step()  # zero gradient: ratio 1, zero step, nothing NaN
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 1.0, -0.25]))


@pytest.mark.parametrize("kwargs", [dict(nesterov=True, weight_decay=1e-3), dict(momentum_form="paper", clip=True),
                                    dict(momentum=0.0, weight_decay=1e-3)])
def test_lars_foreach_equals_single_tensor(kwargs):
    """The torch._foreach_* path equals the per-tensor loop."""
    harness.check_foreach_equals_loop(LARS, lr=0.5, **{"trust_coefficient": 0.01, **kwargs})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_nonfinite_gradient_skips_the_step(bad, foreach):
    """A NaN/Inf gradient skips the whole step (weights and buffers), counted; then as if the batch was dropped."""
    factory = lambda ps: LARS(ps, lr=0.1, weight_decay=1e-3, nesterov=True, foreach=foreach)  # noqa: E731
    harness.check_nonfinite_gradient_skips_the_step(factory, bad)
    harness.check_skip_request(factory)


def test_lars_contract():
    """Closure once under grad, closure=None, exact resume from state_dict, sparse gradients rejected."""
    factory = lambda ps: LARS(ps, lr=0.2, weight_decay=1e-3, momentum_form="paper", nesterov=True)  # noqa: E731
    harness.check_closure_runs_once_with_grad(factory)
    harness.check_resume_continues_exactly(factory)
    harness.check_sparse_gradient_rejected(factory, "LARS")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=-0.1), "Invalid lr"),
    (dict(momentum=1.0), "Invalid momentum"),
    (dict(momentum=-0.5), "Invalid momentum"),
    (dict(trust_coefficient=-1e-3), "Invalid trust_coefficient"),
    (dict(eps=-1e-8), "Invalid eps"),
    (dict(weight_decay=-1e-4), "Invalid weight_decay"),
    (dict(momentum_form="inside"), "Invalid momentum_form.*Supported"),
    (dict(momentum=0.0, nesterov=True), "Nesterov momentum requires momentum > 0"),
])
def test_lars_rejects_bad_hyperparameters(kwargs, match):
    """Bad hyperparameters fail at construction, naming the argument."""
    with pytest.raises(ValueError, match=match):
        LARS([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_lars_rejects_bad_param_group_values():
    """Group overrides are checked too (the param_groups helper sets them)."""
    opt = LARS([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": -1.0})


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_long_run_with_buffer_rescaling(foreach, nesterov):
    """Over many steps (the scaled momentum buffer is folded back every 9 steps at m = 0.5) LARS still equals
    the plain-Python reference, in the PyTorch form under a changing LR."""
    weights, grad_seq = _problem(steps=30, seed=3)
    lrs = [0.5 * (1 - t / 30) ** 2 + 0.01 for t in range(30)]
    expected = reference_lars([w.flatten().tolist() for w in weights],
                              [[g.flatten().tolist() for g in gs] for gs in grad_seq], lrs, momentum=0.5,
                              weight_decay=1e-2, eta=0.05, eps=1e-8, paper_form=False, nesterov=nesterov)
    got = _run_lars(weights, grad_seq, lrs, momentum=0.5, weight_decay=1e-2, trust_coefficient=0.05,
                    nesterov=nesterov, foreach=foreach)
    for p, e in zip(got, expected, strict=True):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=torch.float64))


def test_lars_momentum_correction_turns_paper_form_into_pytorch_form():
    """scale_momentum_(lr_new / lr_old) at each LR change (Goyal et al.) makes the paper form equal the PyTorch form."""
    weights, grad_seq = _problem(steps=6)
    lrs = [1.0, 1.0, 0.5, 0.25, 2.0, 2.0]
    kw = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = LARS(params, lr=lrs[0], momentum_form="paper", **kw)
    for grads, lr in zip(grad_seq, lrs, strict=True):
        opt.scale_momentum_(lr / opt.param_groups[0]["lr"])
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    expected = _run_lars(weights, grad_seq, lrs, momentum_form="pytorch", **kw)
    for a, b in zip(params, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert opt.momentum_buffer(params[0]).shape == params[0].shape
