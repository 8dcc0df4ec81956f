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
