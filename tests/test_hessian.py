"""Hessian spectrum tools against the dense Hessian of a tiny network (torch.func.jacrev twice + eigvalsh)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from lightning_lbo.capture import capture_paused
from lightning_lbo.hessian import (
    HessianOperator,
    HVPBudgetExceeded,
    hutchinson_trace,
    lanczos_quadrature,
    parameters_of,
    power_iteration,
    random_vector,
    slq_density,
    top_eigenvalues,
)
from tests.helpers.ddp import spawn_gloo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: no thread contention


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().float()


def tiny_data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) * 2, torch.randint(0, 3, (n,), generator=g)


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """Exact eval-mode Hessian in float64 over the named parameters (all by default), by torch.func."""
    m = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in m.named_parameters() if names is None or k in names}
    buffers = {k: v.detach().clone() for k, v in m.named_buffers()}
    keys, shapes = list(params), [params[k].shape for k in params]
    flat = torch.cat([params[k].reshape(-1) for k in keys])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        p = {k: c.view(s) for k, c, s in zip(keys, chunks, shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(m, ({**p}, {**buffers}), (x.double(),)), y)

    return jacrev(jacrev(loss))(flat)  # reverse-over-reverse: forward-mode BN rules are not exact here


def finite_difference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Train-mode (batch statistics) Hessian by central differences of float64 gradients.

    torch.func's second derivative of batch-norm with batch statistics is not symmetric here, so a
    derivative-free oracle is used for that mode.
    """
    m = copy.deepcopy(model).double().train()
    params = list(m.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).detach()

    def grad_at(theta: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(theta, params)
        loss = nn.functional.cross_entropy(m(x.double()), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    cols = [(grad_at(flat + h * e) - grad_at(flat - h * e)) / (2 * h) for e in eye]
    return torch.stack(cols, 1)


def test_hvp_matches_dense_hessian_eval_and_train_bn():
    """HVP columns equal torch.func.hessian; train-mode BN restores the running stats and flags."""
    model = tiny_net()
    x, y = tiny_data()
    model.train()
    running = model[1].running_mean.clone()
    for mode in ("eval", "train"):
        op = HessianOperator(model, [(x, y)], loss_fn=ce_loss, bn_mode=mode)
        exact = dense_hessian(model, x, y) if mode == "eval" else finite_difference_hessian(model, x, y)
        torch.testing.assert_close(op.dense().double(), exact, atol=2e-5, rtol=1e-4)
    assert model.training and model[1].training
    torch.testing.assert_close(model[1].running_mean, running, atol=0, rtol=0)


def test_hvp_parameter_filter_gives_the_block_of_the_hessian():
    """Restricting to one layer's parameters gives that layer's diagonal block; two batches are weighted by size."""
    model = tiny_net()
    x, y = tiny_data(30)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    op = HessianOperator(model, batches, loss_fn=ce_loss, params=parameters_of(model[3]))
    exact = dense_hessian(model, x, y, names=["3.weight", "3.bias"])
    torch.testing.assert_close(op.dense().double(), exact, atol=2e-5, rtol=1e-4)


def test_top_eigenvalues_within_one_percent_of_eigvalsh():
    """Lanczos top-3 and power-iteration top-2 (deflation) match the dense spectrum to 1%."""
    model = tiny_net()
    x, y = tiny_data()
    evals = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    by_magnitude = evals[evals.abs().argsort(descending=True)]
    op = HessianOperator(model, [(x, y)], loss_fn=ce_loss)
    lz = top_eigenvalues(op, k=3, method="lanczos", max_iters=op.numel, tol=1e-4)
    assert lz.converged
    for got, want in zip(lz.eigenvalues, evals.flip(0)[:3].tolist(), strict=True):
        assert got == pytest.approx(want, rel=1e-2)
    pw = power_iteration(HessianOperator(model, [(x, y)], loss_fn=ce_loss), k=2, max_iters=2000, tol=1e-7)
    assert pw.converged
    want = sorted(by_magnitude[:2].tolist(), reverse=True)
    for got, w in zip(pw.eigenvalues, want, strict=True):
        assert got == pytest.approx(w, rel=1e-2)
    # The eigenvector satisfies H v = lambda v.
    hv = op.matvec(pw.eigenvectors[0])
    assert (hv - pw.eigenvalues[0] * pw.eigenvectors[0]).norm() < 0.05 * abs(pw.eigenvalues[0])


def test_hutchinson_trace_matches_exact_trace_within_its_error():
    """Hutchinson with Rademacher probes is within 4 exact standard deviations of tr(H)."""
    model = tiny_net()
    x, y = tiny_data()
    h = dense_hessian(model, x, y)
    n = 400
    result = hutchinson_trace(HessianOperator(model, [(x, y)], loss_fn=ce_loss), max_samples=n, tol=1e-9)
    exact_sd = math.sqrt(2 * (h.pow(2).sum() - h.diagonal().pow(2).sum()).item() / n)
    assert result.num_hvps == n and len(result.samples) == n
    assert abs(result.trace - h.trace().item()) < 4 * exact_sd
    assert result.std_error == pytest.approx(exact_sd, rel=0.3)
    # Each quadratic form is exact for its probe.
    v = random_vector(h.shape[0], 0, kind="rademacher").double()
    assert result.samples[0] == pytest.approx((v @ h @ v).item(), rel=1e-4)


def test_slq_quadrature_is_exact_for_low_degree_moments():
    """m Lanczos steps integrate v^T H^p v exactly for p <= 2m - 1; all steps recover the spectrum."""
    model = tiny_net()
    x, y = tiny_data()
    h = dense_hessian(model, x, y)
    op = HessianOperator(model, [(x, y)], loss_fn=ce_loss)
    v = random_vector(op.numel, 3)
    u = (v / v.norm()).double()
    nodes, weights = lanczos_quadrature(op, v, steps=4)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    for p in range(1, 8):
        assert (weights * nodes.pow(p)).sum().item() == pytest.approx((u @ torch.linalg.matrix_power(h, p) @ u).item(),
                                                                     rel=2e-3, abs=1e-7)
    density = slq_density(op, num_probes=4, steps=op.numel, seed=10)
    evals = torch.linalg.eigvalsh(h)
    # Full-length runs: every node with weight is an eigenvalue; averaged weights estimate the density.
    significant = density.nodes[density.weights > 1e-3]
    assert torch.cdist(significant[:, None], evals[:, None]).min(1).values.max() < 1e-3 * evals.abs().max()
    grid = density.grid(400)
    phi = density.evaluate(grid, sigma=0.05 * float(evals.max() - evals.min()))
    assert torch.trapezoid(phi, grid).item() == pytest.approx(1.0, abs=0.02)
    assert density.moment(1) == pytest.approx(h.trace().item() / h.shape[0], rel=0.5)


@pytest.fixture
def default_float64():
    """torch.set_default_dtype(float64) for the test, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32])
def test_hessian_tools_follow_the_model_dtype_under_default_float64(default_float64, model_dtype):
    """With default dtype float64, Lanczos, power iteration, Hutchinson and SLQ run in the model's dtype."""
    model = tiny_net().to(model_dtype)
    x, y = tiny_data()
    x = x.to(model_dtype)
    evals = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    op = HessianOperator(model, [(x, y)], loss_fn=ce_loss)
    assert op.dtype == model_dtype and op.matvec(random_vector(op.numel, 0)).dtype == model_dtype
    rel = 1e-9 if model_dtype == torch.float64 else 1e-4
    torch.testing.assert_close(op.dense().double(), dense_hessian(model, x, y), rtol=rel, atol=rel)
    lz = top_eigenvalues(op, k=2, method="lanczos", max_iters=op.numel, tol=1e-6)
    assert lz.eigenvalues == pytest.approx(evals.flip(0)[:2].tolist(), rel=100 * rel)
    assert lz.eigenvectors[0].dtype == model_dtype
    pw = top_eigenvalues(op, k=1, method="power", max_iters=3000, tol=1e-9)
    assert pw.eigenvalues[0] == pytest.approx(evals[evals.abs().argmax()].item(), rel=1e-3)
    trace = hutchinson_trace(op, max_samples=20, tol=1e-9)
    h = dense_hessian(model, x, y)
    v = random_vector(op.numel, 0, kind="rademacher").double()
    assert trace.samples[0] == pytest.approx((v @ h @ v).item(), rel=100 * rel)
    density = slq_density(op, num_probes=1, steps=op.numel)
    u = random_vector(op.numel, 0).double()
    assert density.moment(1) == pytest.approx((u @ h @ u / u.dot(u)).item(), rel=100 * rel)


def test_hvp_budget_and_capture_paused():
    """The budget stops algorithms (converged=False) and raises on direct use; passes run with capture paused."""
    model = tiny_net()
    x, y = tiny_data()
    seen = []
    model[0].register_forward_hook(lambda *_: seen.append(capture_paused()))
    op = HessianOperator(model, [(x, y)], loss_fn=ce_loss, max_hvps=5)
    result = power_iteration(op, k=1, max_iters=100, tol=1e-12)
    assert result.num_hvps == 5 and not result.converged and len(result.eigenvalues) == 1
    with pytest.raises(HVPBudgetExceeded, match="budget of 5"):
        op.matvec(torch.ones(op.numel))
    assert seen and all(seen) and not capture_paused()
    with pytest.raises(ValueError, match="Invalid bn_mode"):
        HessianOperator(model, [(x, y)], bn_mode="frozen")
    with pytest.raises(ValueError, match="Invalid method"):
        top_eigenvalues(HessianOperator(model, [(x, y)], loss_fn=ce_loss), method="arnoldi")


def _ddp_eigenvalue_worker(rank: int, world_size: int) -> None:
    model = tiny_net()
    x, y = tiny_data(27)
    split = 8  # unequal shards: 8 and 19 samples, so the sample weighting matters
    mine = [(x[:split], y[:split])] if rank == 0 else [(x[split:18], y[split:18]), (x[18:], y[18:])]
    model[1].running_mean.add_(float(rank))  # ranks' BN statistics differ after local training steps
    dist_op = HessianOperator(model, mine, loss_fn=ce_loss)  # syncs buffers from rank 0, like DDP's next forward
    assert dist_op.distributed and dist_op.total_samples == 27
    assert torch.equal(model[1].running_mean, tiny_net()[1].running_mean)
    local_op = HessianOperator(model, [(x, y)], loss_fn=ce_loss, distributed=False)
    got = top_eigenvalues(dist_op, k=2, method="lanczos", max_iters=40, tol=1e-5, seed=7)
    want = top_eigenvalues(local_op, k=2, method="lanczos", max_iters=40, tol=1e-5, seed=7)
    for a, b in zip(got.eigenvalues, want.eigenvalues, strict=True):
        assert a == pytest.approx(b, rel=1e-4), (rank, got.eigenvalues, want.eigenvalues)
    v = random_vector(dist_op.numel, 1)
    torch.testing.assert_close(dist_op.matvec(v), local_op.matvec(v), atol=1e-5, rtol=1e-4)
    pw = power_iteration(dist_op, k=1, max_iters=50, tol=1e-4)
    assert pw.eigenvalues[0] == pytest.approx(power_iteration(local_op, 1, 50, 1e-4).eigenvalues[0], rel=1e-4)


def test_hessian_ddp_two_processes_equal_one_process_on_all_data():
    """2 gloo ranks with 8 and 19 samples give the eigenvalues of 1 process holding all 27."""
    spawn_gloo(_ddp_eigenvalue_worker, world_size=2)
