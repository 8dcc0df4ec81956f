"""The low-rank (Woodbury) inverse on either Kronecker side: equal to a dense fp64 solve and to the dense path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.factors import LowRankFactor
from tests.test_kfac_host_sync import HostSyncCounter


def _dense_factored_solve(A64, G64, grad, lam):
    """``((G + sqrt(lam)/pi I) (x) (A + pi sqrt(lam) I))^{-1} vec(grad)`` in fp64, row-major vec: the Kronecker
    system solved factor by factor, ``(G + ..)^{-1} grad (A + ..)^{-1}`` by two dense solves (``A`` symmetric)."""
    d_a, d_g = A64.shape[0], G64.shape[0]
    pi = ((A64.trace() / d_a) / (G64.trace() / d_g)).sqrt()
    left = torch.linalg.solve(G64 + lam ** 0.5 / pi * torch.eye(d_g, dtype=torch.float64), grad[0].double())
    return torch.linalg.solve(A64 + pi * lam ** 0.5 * torch.eye(d_a, dtype=torch.float64), left.T).T


@pytest.mark.parametrize("damping", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
@pytest.mark.parametrize(("low_rank", "d_a", "d_g"), [("G", 10, 60), ("AG", 100, 60)])
def test_kfac_woodbury_low_rank_g_side_matches_dense_fp64_solve(low_rank, d_a, d_g, damping):
    """24 rows: G = W^T W / n (and A = U^T U / n) through Woodbury, fp32 factors, within 1e-4 of fp64."""
    g = torch.Generator().manual_seed(0)
    n = 24
    rows = torch.cat([torch.randn(n, d_a - 1, generator=g), torch.ones(n, 1)], 1)
    out = 3 * torch.randn(n, d_g, generator=g)
    A64, G64 = rows.double().T @ rows.double() / n, out.double().T @ out.double() / n
    grad = (out.T @ rows / n).unsqueeze(0) + 0.01 * torch.randn(1, d_g, d_a, generator=g)
    factors = {"A": A64.float().unsqueeze(0), "G": LowRankFactor(out.unsqueeze(0), n, G64.float().unsqueeze(0))}
    if "A" in low_rank:
        factors["A"] = LowRankFactor(rows.unsqueeze(0), n, factors["A"])
    dtype = inv.WoodburyKronecker.storage_dtype(damping, torch.float32)
    inverse, ok = inv.WoodburyKronecker.from_factors(factors, damping, dtype, dtype)
    assert bool(ok) and ("A_rows" in inverse.data) == ("A" in low_rank) and "G_rows" in inverse.data
    want = _dense_factored_solve(A64, G64, grad, damping)
    got = inverse.apply(grad, damping)
    unscaled, scale = inverse.apply_unscaled(grad, damping)
    assert got.dtype == torch.float32 and torch.equal(got, unscaled * scale)
    assert ((got[0].double() - want).norm() / want.norm()).item() <= 1e-4


class _Twice(nn.Module):
    """A Linear layer used twice in one forward (two uses of a micro-batch) before a wide head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 40, 3)  # 2x2 output locations: 16 rows of G for 4 examples (d_G = 40)
        self.shared = nn.Linear(160, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.shared(h)) + torch.tanh(self.shared(-h)))


@pytest.mark.parametrize("setting", ["empirical", "mc", "accumulate", "grad_scaler"])
def test_kfac_low_rank_g_side_equals_dense_path(setting):
    """Conv positions, a layer used twice, MC labels, two micro-batches, a real GradScaler: the low-rank G side
    (few output-gradient rows) precondition as the dense Cholesky path does."""
    x, y = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    grads = {}
    for low_rank in (True, False):
        torch.manual_seed(0)
        model = _Twice()
        pre = KFACPreconditioner(model, kl_clip=None, low_rank_inverse=low_rank, damping=1e-2,
                                 fisher="mc" if setting == "mc" else "empirical")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if setting == "grad_scaler" else None
        pre.grad_scaler = scaler
        if setting == "accumulate":
            for half in (slice(0, 2), slice(2, 4)):
                (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
        elif scaler is not None:
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
        else:
            torch.manual_seed(3)  # the same sampled labels in both runs
            F.cross_entropy(model(x), y).backward()
        pre.step()
        for layer in (model.conv, model.shared):
            assert ("G_rows" in pre.inverse(layer).data) == low_rank
        grads[low_rank] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert ((a - b).norm() / b.norm()).item() <= 1e-4


def test_kfac_low_rank_steps_that_refresh_nothing_make_no_host_sync():
    """KFAC.step with low-rank inverses on both sides: no host sync between refreshes."""
    torch.manual_seed(0)
    model = _Twice()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=3, inverse_update_interval=3)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3])
    quiet = []
    for step in range(5):
        opt.zero_grad()
        counter = HostSyncCounter()
        with counter:
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if step % 3:
            quiet.append(counter.ops)
    assert "A_rows" in opt.preconditioner.inverse(model.shared).data
    assert "G_rows" in opt.preconditioner.inverse(model.conv).data
    assert quiet == [[], [], []]


@pytest.mark.parametrize("damping", [1e-2, 1e-4, 1e-6])
def test_kfac_woodbury_unused_columns_match_dense_fp64_solve(damping):
    """Rows whose columns are zero but for a few (conv taps that see only padding) keep V on the used columns;
    the step still equals the dense fp64 solve on every column, with a gradient nonzero on the unused ones
    (as with L2) and on the used ones."""
    g = torch.Generator().manual_seed(0)
    n, d_a, d_g = 6, 40, 12
    rows = torch.zeros(n, d_a)
    rows[:, 10:18] = torch.randn(n, 8, generator=g)
    rows[:, -1] = 1.0
    out = 3 * torch.randn(n, d_g, generator=g)
    A64, G64 = rows.double().T @ rows.double() / n, out.double().T @ out.double() / n
    grad = torch.randn(1, d_g, d_a, generator=g)
    factors = {"A": LowRankFactor(rows.unsqueeze(0), n, A64.float().unsqueeze(0)), "G": G64.float().unsqueeze(0)}
    dtype = inv.WoodburyKronecker.storage_dtype(damping, torch.float32)
    inverse, ok = inv.WoodburyKronecker.from_factors(factors, damping, dtype, dtype)
    assert bool(ok) and inverse.data["A_cols"].tolist() == [*range(10, 18), d_a - 1]
    assert inverse.data["A_rows"].shape == (1, n, 9)
    want = _dense_factored_solve(A64, G64, grad, damping)
    got = inverse.apply(grad, damping)
    assert ((got[0].double() - want).norm() / want.norm()).item() <= 1e-4


class _PaddedTail(nn.Module):
    """A padded 3x3 conv on 1x1 maps (resnet18's layer4 at 32x32): its rows use 17 of 145 columns."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 16, 3, stride=2)
        self.tail = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tail(torch.tanh(self.down(x)))).flatten(1))


@pytest.mark.parametrize("l2", [0.0, 1e-2])
def test_kfac_low_rank_unused_columns_equal_dense_path(l2):
    """The padded conv's step on its used columns only equals the dense Cholesky path (with L2 folded in, the
    unused columns' gradient is nonzero)."""
    x, y = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    grads = {}
    for low_rank in (True, False):
        torch.manual_seed(0)
        model = _PaddedTail()
        pre = KFACPreconditioner(model, kl_clip=None, low_rank_inverse=low_rank, damping=1e-2, l2=l2)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        assert ("A_cols" in pre.inverse(model.tail).data) == low_rank
        grads[low_rank] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert ((a - b).norm() / b.norm()).item() <= 1e-4
