"""Inverse methods against a dense fp64 solve, from damping 1e-2 down to 1e-6 (relative error <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from lightning_lbo.optim.kfac import inverses as inv


def _problem(n=24, d_a=100, d_g=10):
    """Low-rank ``A = U^T U / n`` (a ones column: the bias), ``G`` and the gradient of the same batch (fp32)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(n, d_a - 1, generator=g), torch.ones(n, 1)], 1)
    out = torch.randn(n, d_g, generator=g)
    A64, G64 = rows.double().T @ rows.double() / n, out.double().T @ out.double() / n
    grad = (out.T @ rows / n).unsqueeze(0)
    return rows, n, A64, G64, grad


def _dense_solve(A64, G64, grad, lam, exact):
    """``(G (x) A + lam I)^{-1}`` (exact damping) or the factored Tikhonov system, row-major vec, fp64."""
    d_a, d_g = A64.shape[0], G64.shape[0]
    if exact:
        M = torch.kron(G64, A64) + lam * torch.eye(d_a * d_g, dtype=torch.float64)
    else:
        pi = ((A64.trace() / d_a) / (G64.trace() / d_g)).sqrt()
        M = torch.kron(G64 + lam ** 0.5 / pi * torch.eye(d_g, dtype=torch.float64),
                       A64 + pi * lam ** 0.5 * torch.eye(d_a, dtype=torch.float64))
    return torch.linalg.solve(M, grad[0].double().reshape(-1)).reshape(d_g, d_a)


@pytest.mark.parametrize("damping", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "eigen"])
def test_kfac_inverse_methods_match_dense_fp64_solve_down_to_small_damping(method, damping):
    """fp32 factors (eigen below 1e-3: fp64 factors, as the warning says); storage dtype by the method's policy."""
    rows, n, A64, G64, grad = _problem()
    cls = {"cholesky": inv.CholeskyKronecker, "woodbury": inv.WoodburyKronecker, "eigen": inv.EigenKronecker}[method]
    factor_dtype = torch.float64 if method == "eigen" and damping < 1e-3 else torch.float32
    factors = {"A": A64.to(factor_dtype).unsqueeze(0), "G": G64.to(factor_dtype).unsqueeze(0),
               "rows": rows.unsqueeze(0), "n": n}
    dtype = cls.storage_dtype(damping, factor_dtype)
    inverse, ok = cls.from_factors(factors, damping, dtype, dtype)
    assert bool(ok)
    got = inverse.apply(grad, damping)[0].double()
    want = _dense_solve(A64, G64, grad, damping, exact=method == "eigen")
    assert ((got - want).norm() / want.norm()).item() <= 1e-4


@pytest.mark.parametrize("damping", [1e-2, 1e-6])
def test_kfac_unit_wise_inverse_matches_dense_solve(damping):
    """(F_u + lam I)^{-1} grad_u for nearly singular 2x2 unit Fisher blocks (exact damping: below 1e-3 the
    factors must be fp64, like the eigen method's)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(64, 10, 2, generator=g)
    v[:, :, 1] = v[:, :, 0] + 1e-3 * v[:, :, 1]  # gamma and beta gradients almost collinear
    F64 = torch.einsum("nuk,nul->ukl", v.double(), v.double()) / 64
    grad = torch.randn(10, 2, generator=g)
    factor_dtype = torch.float64 if damping < 1e-3 else torch.float32
    dtype = inv.UnitWise.storage_dtype(damping, factor_dtype)
    inverse, ok = inv.UnitWise.from_factors({"F": F64.to(factor_dtype)}, damping, dtype, dtype)
    want = torch.linalg.solve(F64 + damping * torch.eye(2, dtype=torch.float64), grad.double().unsqueeze(2))[..., 0]
    got = inverse.apply(grad, damping).double()
    assert bool(ok) and ((got - want).norm() / want.norm()).item() <= 1e-4


class _Named:
    """A stand-in for a block in invert_with_fallback's jobs (only its name is read)."""

    def __init__(self, name):
        self.name = name


def _psd_projection(m64):
    d, q = torch.linalg.eigh(m64)
    return q @ torch.diag(d.clamp_min(0)) @ q.T


def test_kfac_cholesky_inverse_of_singular_damped_factor_flags_instead_of_raising():
    """G + delta I exactly singular in fp32 (delta below G's rounding): ok is False, no LinAlgError; the ladder's
    fp64 rung then equals a dense fp64 solve."""
    A = torch.eye(3).mul(1e12).unsqueeze(0)  # pi = 1e6: root / pi = 3e-8, lost next to 1 in fp32
    G = torch.ones(1, 2, 2)
    grad = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(2))
    inverse, ok = inv.CholeskyKronecker.from_factors({"A": A, "G": G}, 1e-3, torch.float32, torch.float32)
    assert not bool(ok)
    (inverse,), failed = inv.invert_with_fallback([(_Named("conv"), inv.CholeskyKronecker, {"A": A, "G": G},
                                                    1e-3, torch.float32)])
    want = _dense_solve(A[0].double(), G[0].double(), grad, 1e-3, exact=False)
    got = inverse.apply(grad, 1e-3)[0].double()
    assert failed == [] and ((got - want).norm() / want.norm()).item() <= 1e-4


def test_kfac_inverse_ladder_projects_factors_indefinite_by_rounding():
    """A G with an eigenvalue -1.2e-7 (fp32 rounding of a rank-1 factor) below every damping rung: the plain gradient
    before; now the damped inverse of its PSD projection, equal to a dense fp64 solve of the projected system."""
    A = torch.eye(3).mul(1e14).unsqueeze(0)  # root / pi = 3e-9 (3e-8 at 100x damping) < 1.2e-7
    off = 1.0 + 2.0 ** -23
    G = torch.tensor([[[1.0, off], [off, 1.0]]])
    grad = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(3))
    (inverse,), failed = inv.invert_with_fallback([(_Named("conv"), inv.CholeskyKronecker, {"A": A, "G": G},
                                                    1e-3, torch.float32)])
    want = _dense_solve(A[0].double(), _psd_projection(G[0].double()), grad, 1e-3, exact=False)
    got = inverse.apply(grad, 1e-3)[0].double()
    assert failed == [] and ((got - want).norm() / want.norm()).item() <= 1e-4


@pytest.mark.parametrize("scale", [1.0, 1e9])
@pytest.mark.parametrize("damping", [1e-2, 1e-3])
def test_kfac_unit_wise_inverse_of_rank_one_unit_matches_dense_fp64_solve(scale, damping):
    """A unit whose gamma/beta gradients are exactly collinear (a BatchNorm channel seeing two values): F_u is rank 1
    and, at scale 1e9, its fp32 Cholesky fails; the closed form equals a dense fp64 solve of the same fp32 factor."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(2, 6, 1, generator=g) * torch.tensor([1.0, -0.5])  # [examples, units, (gamma, beta)]
    F = (torch.einsum("nuk,nul->ukl", v, v) * scale).float()
    grad = torch.randn(6, 2, generator=g)
    inverse, ok = inv.UnitWise.from_factors({"F": F}, damping, torch.float32, torch.float32)
    want = torch.linalg.solve(F.double() + damping * torch.eye(2, dtype=torch.float64), grad.double().unsqueeze(2))
    got = inverse.apply(grad, damping).double()
    assert bool(ok) and ((got - want[..., 0]).norm() / want.norm()).item() <= 1e-4


def test_kfac_unit_wise_inverse_without_bias_is_reciprocal():
    """k = 1 (BatchNorm(affine) without bias, LayerNorm(bias=False)): 1 / (F + lambda)."""
    F = torch.tensor([[[0.0]], [[3.0]]])
    inverse, ok = inv.UnitWise.from_factors({"F": F}, 0.5, torch.float32, torch.float32)
    assert bool(ok) and torch.equal(inverse.apply(torch.ones(2, 1), 0.5), torch.tensor([[2.0], [1.0 / 3.5]]))
