"""LAMB against its formula (You et al. 2019) in numpy, against torch.optim.AdamW without adaptation; contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_lbo.optim.lars import LAMB
from tests import optim_harness as harness


def reference_lamb(weights, grad_seq, *, lr, beta1, beta2, eps, weight_decay, bias_correction=True,
                   max_trust_ratio=None, adapt=True):
    """Algorithm 2 of the LAMB paper (with the usual bias correction) in float64 numpy, per tensor."""
    ws = [w.copy() for w in weights]
    ms = [np.zeros_like(w) for w in weights]
    vs = [np.zeros_like(w) for w in weights]
    for t, grads in enumerate(grad_seq, start=1):
        for i, g in enumerate(grads):
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            m_hat, v_hat = (ms[i] / (1 - beta1 ** t), vs[i] / (1 - beta2 ** t)) if bias_correction else (ms[i], vs[i])
            u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * ws[i]
            w_norm, u_norm = np.linalg.norm(ws[i]), np.linalg.norm(u)
            ratio = w_norm / u_norm if adapt and w_norm > 0 and u_norm > 0 else 1.0
            if max_trust_ratio is not None:
                ratio = min(ratio, max_trust_ratio)
            ws[i] = ws[i] - lr * ratio * u
    return ws


def _problem(steps=5, seed=1):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    weights = [rng.standard_normal(s) for s in shapes]
    weights[1] *= 1e-3  # a tiny weight norm: trust ratio << 1, exercised by max_trust_ratio below
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]
    return weights, grads


IMPLS = {"loop": dict(foreach=False), "foreach": dict(foreach=True, fused=False), "fused": dict(fused=True)}


def _run_lamb(weights, grad_seq, **kwargs):
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    opt = LAMB(params, **kwargs)
    for grads in grad_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [dict(), dict(bias_correction=False), dict(max_trust_ratio=0.5),
                                     dict(weight_decay=0.0)])
def test_lamb_matches_formula(impl, options):
    """The update equals the paper's formula per tensor (bias correction on/off, trust clipping, no decay)."""
    if impl == "fused" and options.get("bias_correction") is False:
        pytest.skip("the fused kernel always bias-corrects (rejected at construction, tested below)")
    weights, grad_seq = _problem()
    kw = {"lr": 0.05, "eps": 1e-6, "weight_decay": 0.01, **options}
    expected = reference_lamb(weights, grad_seq, beta1=0.9, beta2=0.99, **kw)
    got = _run_lamb(weights, grad_seq, betas=(0.9, 0.99), **IMPLS[impl], **kw)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_without_adaptation_equals_adamw(impl):
    """lars_adapt=False (ratio 1) is AdamW with decoupled weight decay."""
    m1, m2 = harness.tiny_model(), harness.tiny_model()
    lamb = LAMB(m1.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, lars_adapt=False,
                **IMPLS[impl])
    adamw = torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    harness.train(m1, lamb, range(5))
    harness.train(m2, adamw, range(5))
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_lamb_zero_weight_gives_ratio_one():
    """||w|| = 0 gives trust ratio 1: the first step is lr * sign-like Adam step m_hat / (sqrt(v_hat) + eps)."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = LAMB([w], lr=0.1, eps=1e-12)
    w.grad = torch.tensor([2.0, -3.0, 0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.1, -0.1]))


def test_lamb_group_switches():
    """Per-group weight_decay and lars_adapt: the groups follow the formula with their own switches."""
    weights, grad_seq = _problem()
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    opt = LAMB([{"params": [params[0], params[2]]}, {"params": [params[1]], "weight_decay": 0.0, "lars_adapt": False}],
               lr=0.05, betas=(0.9, 0.99), weight_decay=0.01)
    for grads in grad_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    kw = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6)
    adapted = reference_lamb([weights[0], weights[2]], [[g[0], g[2]] for g in grad_seq], weight_decay=0.01, **kw)
    plain = reference_lamb([weights[1]], [[g[1]] for g in grad_seq], weight_decay=0.0, adapt=False, **kw)
    for p, e in zip([params[0], params[2], params[1]], adapted + plain, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)


def test_lamb_foreach_equals_single_tensor():
    """The torch._foreach_* path equals the per-tensor loop."""
    harness.check_foreach_equals_loop(LAMB, lr=1e-2, weight_decay=0.01, max_trust_ratio=10.0, fused=False)


def test_lamb_fused_equals_foreach():
    """The fused-kernel path equals the foreach path, and is the default for CPU float tensors."""
    harness.check_foreach_equals_loop(lambda ps, foreach, **kw: LAMB(ps, fused=foreach, **kw), lr=1e-2,
                                      weight_decay=0.01, max_trust_ratio=10.0)
    from lightning_lbo.optim.lamb import _use_fused

    opt = LAMB([torch.nn.Parameter(torch.ones(2))])
    assert _use_fused(opt.param_groups[0], opt.param_groups[0]["params"])
    opt = LAMB([torch.nn.Parameter(torch.ones(2))], bias_correction=False)
    assert not _use_fused(opt.param_groups[0], opt.param_groups[0]["params"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_nonfinite_gradient_skips_the_step(bad, impl):
    """A NaN/Inf gradient skips the whole step (weights, moments, step counts), counted; then as if dropped."""
    harness.check_nonfinite_gradient_skips_the_step(lambda ps: LAMB(ps, lr=1e-2, weight_decay=0.01, **IMPLS[impl]),
                                                    bad)
    harness.check_skip_request(lambda ps: LAMB(ps, lr=1e-2, weight_decay=0.01, **IMPLS[impl]))


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_first_step_skipped_stays_finite(impl):
    """A tensor whose first gradient is non-finite has step 0: bias correction must not divide by zero later."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([w], lr=0.1, **IMPLS[impl])
    w.grad = torch.tensor([float("nan"), 1.0, 1.0])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and opt.state[w]["step"].item() == 0
    w.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(w).all() and opt.state[w]["step"].item() == 1


def test_lamb_contract():
    """Closure once under grad, closure=None, exact resume from state_dict, sparse gradients rejected."""
    factory = lambda ps: LAMB(ps, lr=1e-2, weight_decay=0.01)  # noqa: E731
    harness.check_closure_runs_once_with_grad(factory)
    harness.check_resume_continues_exactly(factory)
    harness.check_sparse_gradient_rejected(factory, "LAMB")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=-1e-3), "Invalid lr"),
    (dict(betas=(1.0, 0.999)), r"Invalid betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"Invalid betas\[1\]"),
    (dict(eps=-1.0), "Invalid eps"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(max_trust_ratio=0.0), "Invalid max_trust_ratio"),
    (dict(fused=True, foreach=False), "fused=True needs the multi-tensor path"),
    (dict(fused=True, bias_correction=False), "fused=True always applies bias correction"),
])
def test_lamb_rejects_bad_hyperparameters(kwargs, match):
    """Bad hyperparameters fail at construction, naming the argument."""
    with pytest.raises(ValueError, match=match):
        LAMB([torch.nn.Parameter(torch.ones(2))], **kwargs)
