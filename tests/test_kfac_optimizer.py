"""KFAC optimizer and preconditioner behaviour: natural-gradient step, accumulation, checkpoints, numerics."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.capture import curvature_capture_paused
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner, StaleStatistics
from lightning_lbo.optim.kfac.inverses import WoodburyKronecker


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_kfac_gaussian_natural_gradient_step_solves_least_squares():
    """Linear layer, unit Gaussian likelihood (exact G = I): one step with lr 1 lands on the LSQ solution."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    X, Y = torch.randn(50, 4), torch.randn(50, 2)
    pre = KFACPreconditioner(lin, damping=1e-9, factor_decay=1.0, factor_update_interval=1000,
                             inverse_update_interval=1000, kl_clip=None, inverse_method="eigen",
                             factor_dtype=torch.float64)
    (0.5 * (lin(X) - Y).pow(2).sum(1).mean()).backward()
    pre.step()  # captures A (and an empirical G we replace by the exact one)
    st = pre.blocks[0]
    st.set_factor("G", torch.eye(2).unsqueeze(0))
    st.invalidate_inverse()  # force re-inversion with the exact Fisher
    lin.zero_grad()
    (0.5 * (lin(X) - Y).pow(2).sum(1).mean()).backward()
    pre.step()
    with torch.no_grad():
        for p in lin.parameters():
            p -= p.grad
    Xb = torch.cat([X, torch.ones(50, 1)], 1)
    sol = torch.linalg.lstsq(Xb.double(), Y.double()).solution.T.float()
    torch.testing.assert_close(torch.cat([lin.weight, lin.bias[:, None]], 1).detach(), sol, rtol=1e-4, atol=1e-4)


def test_kfac_accumulating_three_micro_batches_equals_one_big_batch():
    """Factors and preconditioned gradients of 3 accumulated micro-batches (loss / 3) equal one batch."""
    x, y = _batch(12)
    results = []
    for chunks in (1, 3):
        torch.manual_seed(0)
        model = _net()
        opt = KFAC(model, lr=0.1, factor_decay=1.0)
        opt.zero_grad()
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            (F.cross_entropy(model(xc), yc) / chunks).backward()
        opt.step()
        results.append((opt.preconditioner.blocks, [p.detach().clone() for p in model.parameters()]))
    (s1, p1), (s3, p3) = results
    for a, b in zip(s1, s3, strict=True):
        for k in a.factors:
            torch.testing.assert_close(a.factors[k], b.factors[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(p1, p3, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(seed=i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(("method", "decay", "intervals"), [("cholesky", 0.5, (2, 3)), ("eigen", 0.5, (2, 3)),
                                                            ("cholesky", 1.0, (2, 3)), ("cholesky", 1.0, (1, 1))])
def test_kfac_state_dict_round_trip_continues_exactly(method, decay, intervals):
    """Resume from state_dict (factors refreshed since the last inversion; or refreshed and inverted at the
    first resumed step) = the uninterrupted run. Fresh factors (decay 1) put the 100-wide head on the
    Woodbury inverse (12 rows)."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, inverse_method=method, factor_update_interval=intervals[0],
              factor_decay=decay, inverse_update_interval=intervals[1], damping=lambda step: 1e-2 / (1 + step))
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, **kw)
    _train(model, opt, 5)
    assert isinstance(opt.preconditioner.blocks[-1].inverse, WoodburyKronecker) == (decay == 1.0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, start=5)
    resumed = _net()
    resumed.load_state_dict(saved_model)
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.preconditioner.steps == 5
    _train(resumed, opt2, 4, start=5)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kfac_bf16_autocast_keeps_fp32_factors():
    """Under CPU bf16 autocast factors and inverses are fp32 and close to the fp32 run."""
    x, y = _batch(16)
    factors = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = _net()
        opt = KFAC(model, lr=0.1, factor_decay=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        factors.append([st.factors for st in opt.preconditioner.blocks])
        for st in opt.preconditioner.blocks:
            assert all(t.dtype == torch.float32 for t in st.factors.values())
            assert all(t.dtype == torch.float32 for t in st.inverse.tensors())
    for f32, bf16 in zip(*factors, strict=True):
        for k in f32:
            torch.testing.assert_close(bf16[k], f32[k], rtol=0.05, atol=0.05 * f32[k].abs().max().item())


def test_kfac_non_finite_batch_skips_refresh_and_update():
    """An inf gradient batch: factors, weights and momentum unchanged; both skips are counted."""
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    factors = [dict(st.factors) for st in opt.preconditioner.blocks]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = _batch()
    x[0, 0, 0, 0] = float("inf")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.preconditioner.skipped_refreshes.item() >= 1
    assert opt.nonfinite_skips.item() == 1
    with pytest.warns(DeprecationWarning, match="nonfinite_skips"):
        assert opt.skipped_steps is opt.nonfinite_skips
    for st, old in zip(opt.preconditioner.blocks, factors, strict=True):
        for k in old:
            torch.testing.assert_close(st.factors[k], old[k], rtol=0, atol=0)
    for p, b, m in zip(model.parameters(), before, bufs, strict=True):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], m)
    _train(model, opt, 1, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_failed_inverse_falls_back_to_plain_gradient_with_warning():
    """A factor no damping can make positive definite: fp32, fp64, 10x, 100x fail -> identity, warned."""
    torch.manual_seed(0)
    model = _net()
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-4)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    st = pre.blocks[0]
    st.set_factor("A", -torch.eye(st.factors["A"].shape[-1]).unsqueeze(0))
    st.invalidate_inverse()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = st.grad_matrix().clone()
    with pytest.warns(RuntimeWarning, match="plain gradient"):
        pre.step()
    torch.testing.assert_close(st.grad_matrix(), grad)
    assert pre.inverse_fallbacks == 1


def test_kfac_batch_of_two_through_batchnorm_stack_steps_without_crash_or_fallback():
    """BatchNorm over two examples blows G up to ~1e8, so G + delta I is singular in fp32 (the resnet18 16x16 batch-2
    LinAlgError): the step neither raises nor falls back to the plain gradient, and the weights stay finite."""
    torch.manual_seed(9)
    layers = [nn.Linear(8, 64)]
    for _ in range(4):
        layers += [nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64)]
    model = nn.Sequential(*layers, nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = KFAC(model, lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 8), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.preconditioner.inverse_fallbacks == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_captures_only_in_training_when_due_and_not_paused():
    """No statistics in eval mode, inside curvature_capture_paused, or on steps that are not due."""
    torch.manual_seed(0)
    model = _net()
    pre = KFACPreconditioner(model, factor_update_interval=3, kl_clip=None)
    x, y = _batch()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    assert not pre.capture.active
    model.train()
    with curvature_capture_paused():
        F.cross_entropy(model(x), y).backward()
    assert not pre.capture.active
    F.cross_entropy(model(x), y).backward()
    assert pre.capture.active
    pre.step()
    assert pre.blocks[0].refreshes["A"] == 1
    F.cross_entropy(model(x), y).backward()  # step 1: not due
    assert not pre.capture.active
    pre.step()
    pre.step()
    F.cross_entropy(model(x), y).backward()  # step 3: due again
    assert pre.capture.active


def test_kfac_stale_statistics_grow_intervals_of_stable_statistics():
    """Identical batches: every statistic is stable, intervals grow, refreshes are fewer than fixed ones."""
    torch.manual_seed(0)
    model = _net()
    policy = StaleStatistics(threshold=0.05, growth=2.0, max_interval=8)
    pre = KFACPreconditioner(model, factor_update_interval=1, kl_clip=None, stale_statistics=policy)
    x, y = _batch()
    for _ in range(20):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    st = pre.blocks[0]
    assert st.interval["A"] == 8 and st.refreshes["A"] < 10
    assert policy.next_interval(4, stable=False) == 2 and policy.next_interval(1, stable=True) == 2


def test_kfac_unsupported_layers_warned_once_and_excludable():
    """Unsupported parameterised layers are listed in one warning; exclude removes a layer; none -> error."""
    model = nn.Sequential(nn.PReLU(4), nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"0 \(PReLU\)"):
        pre = KFACPreconditioner(model)
    assert [st.name for st in pre.blocks] == ["1", "2"]
    with pytest.warns(UserWarning, match=r"K-FAC preconditions 1 layer; "):
        KFACPreconditioner(nn.Sequential(nn.PReLU(4), nn.Linear(4, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = KFACPreconditioner(model, exclude=[model[2]])
    assert [st.name for st in pre.blocks] == ["1"]
    with pytest.raises(ValueError, match="no layer K-FAC supports"):
        KFACPreconditioner(nn.Sequential(nn.PReLU(3)))


def test_kfac_invalid_arguments_name_the_fix():
    """Bad configuration fails at construction with the argument and the choices."""
    model = _net()
    with pytest.raises(ValueError, match="Invalid damping"):
        KFAC(model, damping=0.0)
    with pytest.raises(ValueError, match="Invalid fisher: 'true'. Supported"):
        KFAC(model, fisher="true")
    with pytest.raises(ValueError, match="Invalid inverse_method"):
        KFAC(model, inverse_method="svd")
    with pytest.raises(ValueError, match="Invalid momentum"):
        KFAC(model, momentum=1.5)
    with pytest.raises(ValueError, match="Invalid factor_update_interval"):
        KFAC(model, factor_update_interval=0)
    opt = KFAC(model.parameters(), lr=0.1)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="not bound"):
        opt.step()


def test_kfac_step_runs_closure_once_and_matches_without_closure():
    """step(closure) calls the closure once under grad and equals backward + step()."""
    x, y = _batch()
    params = []
    for use_closure in (True, False):
        torch.manual_seed(0)
        model = _net()
        opt = KFAC(model, lr=0.1)
        calls = []

        def closure(opt=opt, model=model, calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if use_closure:
            opt.step(closure)
            assert len(calls) == 1
        else:
            closure()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kfac_amp_grad_scaler_scale_is_removed_from_g():
    """16-mixed: with the loss scaled by the grad scaler's scale, G equals the unscaled run's G."""
    from types import SimpleNamespace

    x, y = _batch()
    factors = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = _net()
        pre = KFACPreconditioner(model, kl_clip=None)
        if scale is not None:
            pre.grad_scaler = SimpleNamespace(_scale=torch.tensor(scale), is_enabled=lambda: True)
        (F.cross_entropy(model(x), y) * (scale or 1.0)).backward()
        if scale is not None:
            for p in model.parameters():  # what GradScaler.unscale_ does before the step
                p.grad /= scale
        pre.step()
        factors.append([dict(st.factors) for st in pre.blocks])
    for a, b in zip(*factors, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fold", [False, True])
def test_kfac_skipped_step_with_weight_decay_leaves_everything_bit_identical(fold):
    """A non-finite gradient with weight_decay > 0: weights, momentum buffers and factors bit-identical."""
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, weight_decay=1e-2, fold_weight_decay=fold, factor_update_interval=1,
               momentum_correction=False, weight_rescaling=True)
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    factors = [pre_factors for pre_factors in (opt.preconditioner.factors(b.module) for b in opt.preconditioner.blocks)]
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")  # finite statistics, non-finite gradient
    opt.param_groups[0]["lr"] = 0.05  # an LR change on the skipped step (momentum correction off)
    opt.step()
    assert opt.nonfinite_skips.item() == 1
    for p, b, m in zip(model.parameters(), before, bufs, strict=True):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], m)
    for block, old in zip(opt.preconditioner.blocks, factors, strict=True):
        for stat, value in old.items():
            assert torch.equal(block.factors[stat], value), (block.name, stat)


def test_kfac_requested_skip_leaves_factors_of_finite_statistics_unchanged():
    """skip_next_step_where(True) on a refresh step: the (finite) statistics are not committed either."""
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    _train(model, opt, 1)
    factors = [dict(b.factors) for b in opt.preconditioner.blocks]
    x, y = _batch(seed=5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.skip_next_step_where(torch.tensor(True))
    opt.step()
    for block, old in zip(opt.preconditioner.blocks, factors, strict=True):
        assert all(torch.equal(block.factors[s], old[s]) for s in old)


def test_kfac_load_state_dict_validates_factors():
    """Wrong-shape factors raise naming the layer; non-finite factors reset that layer's statistics (warned)."""
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    _train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    bad_shape = copy.deepcopy(state)
    bad_shape["kfac"]["blocks"][1]["factors"]["A"] = torch.zeros(1, 7, 7)
    fresh = KFAC(_net(), lr=0.1, factor_update_interval=1)
    with pytest.raises(ValueError, match=r"layer '3' has A of shape \(1, 7, 7\).*needs \(1, 101, 101\)"):
        fresh.load_state_dict(bad_shape)
    nan = copy.deepcopy(state)
    nan["kfac"]["blocks"][0]["factors"]["G"][0, 0, 0] = float("nan")
    resumed_model = _net()
    resumed = KFAC(resumed_model, lr=0.1, factor_update_interval=1)
    with pytest.warns(RuntimeWarning, match="layer '0' has non-finite factors; its statistics are reset"):
        resumed.load_state_dict(nan)
    assert resumed.preconditioner.factors(resumed_model[0]) == {}  # re-estimated at the next step
    saved_a = state["kfac"]["blocks"][1]["factors"]["A"]
    assert torch.equal(resumed.preconditioner.factors(resumed_model[3])["A"], saved_a)
    _train(resumed_model, resumed, 1, start=2)
    assert all(torch.isfinite(t).all() for b in resumed.preconditioner.blocks for t in b.factors.values())
    assert all(torch.isfinite(p).all() for p in resumed_model.parameters())


def test_kfac_skipped_first_refresh_is_no_estimate_for_the_running_average():
    """factor_decay < 1: a non-finite first batch leaves an identity placeholder that the next refresh
    replaces (not averages with): factors and weights equal the run that never saw the bad batch."""
    results = []
    for bad_first in (True, False):
        torch.manual_seed(0)
        model = _net()
        opt = KFAC(model, lr=0.1, factor_decay=0.5, factor_update_interval=1, inverse_update_interval=1)
        if bad_first:
            x, y = _batch(seed=9)
            x[0, 0, 0, 0] = float("nan")
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        _train(model, opt, 2)
        factors = [dict(b.factors) for b in opt.preconditioner.blocks]
        results.append((factors, [p.detach().clone() for p in model.parameters()]))
    (f_bad, p_bad), (f_ref, p_ref) = results
    for a, b in zip(f_bad, f_ref, strict=True):
        assert all(torch.equal(a[s], b[s]) for s in b)
    assert all(torch.equal(a, b) for a, b in zip(p_bad, p_ref, strict=True))


def test_kfac_skipped_refresh_keeps_its_rows_out_of_the_low_rank_inverse():
    """A refresh on a step the optimizer skips (finite statistics, keep False) must not reach the inverse: the
    low-rank (Woodbury) preconditioner after it equals the dense one built from the kept factors."""
    grads = {}
    for low_rank in (True, False):
        torch.manual_seed(0)
        model = _net()
        pre = KFACPreconditioner(model, kl_clip=None, factor_update_interval=2, inverse_update_interval=2,
                                 low_rank_inverse=low_rank)
        for step in range(4):  # refreshes and inverses at steps 0 and 2; step 2 is skipped
            model.zero_grad()
            x, y = _batch(seed=step)
            F.cross_entropy(model(x), y).backward()
            pre.step(keep=torch.tensor(step != 2))
        grads[low_rank] = model[3].weight.grad.clone()
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() <= 1e-4
