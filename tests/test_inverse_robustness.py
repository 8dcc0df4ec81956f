"""Numerical robustness of every K-FAC inverse method as a property (issue 26, item 11).

A fixed-seed sample of the randomized damped factor cases of ``benchmarks/inverse_robustness.py`` (the full
sweep: 10,000 cases, its table in docs/kfac.md "Numerical robustness"): rank-deficient, repeated and clustered
eigenvalues, condition numbers to 1e12, factor and gradient norms from 1e-8 to 1e8, fp64, fp32 and
bf16-reduced factors, through the production ladder (``invert_with_fallback``) and ``apply``. Every case: no
exception, a finite output, no fallback to the plain gradient, and a relative error against a float64 dense
solve of the damped system within ``C (u kappa + rho) + 2 u32`` (see the benchmark's docstring).
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import inverse_robustness as sweep
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.factors import LowRankFactor


def _describe(o: sweep.Outcome) -> str:
    return (f"{o.method} {o.factor_dtype} {o.spectrum} (storage {o.storage}): err {o.error:.3g}, bound {o.bound:.3g}, "
            f"kappa {o.kappa:.3g}, rho {o.rho:.3g}, identity {o.fell_to_identity}, {o.exception}")


@pytest.mark.parametrize("method", sweep.METHODS)
def test_inverse_robustness_random_damped_factors_within_bound(method, one_thread):
    """240 cases per method (80 per factor dtype), seed fixed: the four promises hold in every case."""
    gen = torch.Generator().manual_seed(2026)
    outcomes = [sweep.run_case(gen, method, dtype) for dtype in sweep.FACTOR_DTYPES for _ in range(80)]
    bad = [o for o in outcomes if not o.within or o.fell_to_identity]
    assert not bad, f"{len(bad)} of {len(outcomes)} cases broke a promise, e.g. " + "; ".join(map(_describe, bad[:3]))
    # the sample covers the hard corners it claims to
    assert {o.spectrum for o in outcomes} == set(sweep.SPECTRA)
    assert max(o.kappa for o in outcomes) > 1e8


def _bf16_reduced(m64: torch.Tensor) -> torch.Tensor:
    """Two ranks' shares rounded to bf16 and summed in fp32 (``reduce_dtype=torch.bfloat16``)."""
    return (0.5 * m64).to(torch.bfloat16).float() + (0.5 * m64).to(torch.bfloat16).float()


@pytest.mark.parametrize("method", [inv.CholeskyKronecker, inv.WoodburyKronecker])
def test_inverse_robustness_bf16_reduced_rank_deficient_factor_is_not_dropped(method, one_thread):
    """A rank-2 G reduced in bf16 is indefinite by ~1e-3 of its largest eigenvalue, far beyond fp32 rounding, and a
    damping below that makes every Cholesky fail: the ladder used to refuse the PSD projection (tolerance 1e-5)
    and dropped the layer to the plain gradient. It is now the damped inverse of the projection."""
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    g_true = (q[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q[:, :2].T
    G = _bf16_reduced(g_true)
    d_g = torch.linalg.eigvalsh(G.double())
    assert d_g[0] < -1e-5 * d_g[-1]  # beyond the old tolerance: the case the ladder refused
    rows = torch.randn(2, 9, generator=gen)
    A = (rows.double().T @ rows.double() / 2).float()
    low_rank_a = LowRankFactor(rows.unsqueeze(0), 2, A.unsqueeze(0)) if method is inv.WoodburyKronecker else None
    factors = {"A": low_rank_a if low_rank_a is not None else A.unsqueeze(0), "G": G.unsqueeze(0)}
    damping = 1e-8  # delta_G = sqrt(damping) / pi ~ 1e-4 x G's scale, below its negative eigenvalue
    grad = torch.randn(1, 12, 9, generator=gen)
    (inverse,), failed = inv.invert_with_fallback([(type("B", (), {"name": "fc"})(), method, factors, damping,
                                                    method.storage_dtype(damping, torch.float32))])
    assert failed == []
    # the reference of the factors each method reads: the Woodbury side its rows, the dense side the fp32 A
    a64 = rows.double().T @ rows.double() / 2 if method is inv.WoodburyKronecker else A.double()
    M_ref, _, lo, hi = sweep.dense_systems("cholesky", a64, G.double(), damping)
    want = torch.linalg.solve(M_ref, grad.double().reshape(-1))
    got = inverse.apply(grad, damping).double().reshape(-1)
    bound = sweep.BOUND_C * torch.finfo(torch.float64).eps * hi / lo + 2 * sweep.U32
    assert math.isfinite(bound) and bound < 1e-3
    assert ((got - want).norm() / want.norm()).item() <= bound
