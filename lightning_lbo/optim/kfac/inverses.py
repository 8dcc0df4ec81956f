"""Damped inverses of Kronecker factors and unit-wise blocks, with a numerical fallback ladder.

Two methods (``InverseMethod``):

* ``"cholesky"``: factored Tikhonov damping (Martens & Grosse 2015, section 6.3),

  .. math:: (A + \\pi\\sqrt{\\lambda} I)^{-1} \\otimes (G + \\frac{\\sqrt{\\lambda}}{\\pi} I)^{-1},
     \\qquad \\pi = \\sqrt{\\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}},

  each inverse through a Cholesky factorisation (several times faster than ``eigh`` on big factors).
  Damping is fixed at inversion time.
* ``"eigen"``: eigendecompositions ``A = Q_A diag(d_A) Q_A^T`` (same for G) and the exact damping
  ``1 / (d_G d_A^T + \\lambda)`` applied at preconditioning time, so a damping schedule acts at
  every step without re-inverting.

All work is done in fp32 whatever the training precision. A block whose factorisation fails or is
not finite is retried in fp64, then with 10x and 100x the damping, and finally replaced by the
identity (the plain gradient for that layer) with a warning. Factors are ``[groups, d, d]``.
"""

from __future__ import annotations

import warnings
from enum import Enum

import torch


class InverseMethod(str, Enum):
    CHOLESKY = "cholesky"
    EIGEN = "eigen"


def parse_inverse_method(method: str) -> InverseMethod:
    try:
        return InverseMethod(method)
    except ValueError:
        raise ValueError(f"Invalid inverse_method: {method!r}. Supported: "
                         f"{tuple(m.value for m in InverseMethod)}.") from None


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)


def pi_factor(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``pi = sqrt((tr A / d_A) / (tr G / d_G))`` per group, ``[groups, 1, 1]`` (1 where undefined)."""
    ta = A.diagonal(dim1=1, dim2=2).mean(1)
    tg = G.diagonal(dim1=1, dim2=2).mean(1)
    pi = torch.sqrt(ta / tg)
    pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
    return pi.view(-1, 1, 1)


def _cholesky_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of SPD ``m`` and an ok flag (device tensor; no sync)."""
    chol, info = torch.linalg.cholesky_ex(m)
    inv = torch.cholesky_inverse(chol)
    ok = (info == 0).all() & torch.isfinite(inv).all()
    return inv, ok


def kronecker_inverse(A: torch.Tensor, G: torch.Tensor, damping: float, method: InverseMethod,
                      dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None,
                      n: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Damped inverse data of one Kronecker block and an ok flag.

    Returns ``{"A_inv", "G_inv"}`` (cholesky) or ``{"QA", "dA", "QG", "dG"}`` (eigen), in fp32.
    With ``rows`` (``U: [groups, r, d_A]``, ``A = U^T U / n``, fewer rows than columns; fresh
    statistics only), the A side uses the Sherman-Morrison-Woodbury identity

    .. math:: (U^T U / n + \\delta I)^{-1} = \frac{1}{\\delta}\\left(I - U^T (n\\delta I + U U^T)^{-1} U\right)

    and returns ``{"U", "K_inv", "delta_A", "G_inv"}``: applying it costs ``O(d_G d_A r)`` instead
    of ``O(d_G d_A^2)`` per step.
    """
    A, G = A.to(dtype), G.to(dtype)
    if method is InverseMethod.CHOLESKY:
        pi = pi_factor(A, G)
        root = damping ** 0.5
        if rows is not None:
            U = rows.to(dtype)
            delta = pi * root
            eye_r = torch.eye(U.shape[1], dtype=dtype, device=U.device).expand(U.shape[0], -1, -1)
            K = torch.bmm(U, U.transpose(1, 2)) + (n.to(dtype) * delta) * eye_r
            k_inv, ok_k = _cholesky_inverse(K)
            g_inv, ok_g = _cholesky_inverse(G + (root / pi) * _eye_like(G))
            inv = {"U": U.float(), "K_inv": k_inv.float(), "delta_A": delta.float(), "G_inv": g_inv.float()}
            return inv, ok_k & ok_g
        a_inv, ok_a = _cholesky_inverse(A + (pi * root) * _eye_like(A))
        g_inv, ok_g = _cholesky_inverse(G + (root / pi) * _eye_like(G))
        return {"A_inv": a_inv.float(), "G_inv": g_inv.float()}, ok_a & ok_g
    try:
        dA, QA = torch.linalg.eigh(A)
        dG, QG = torch.linalg.eigh(G)
    except RuntimeError:  # "failed to converge"
        return {}, torch.zeros((), dtype=torch.bool, device=A.device)
    # Factors are PSD: negative eigenvalues are round-off.
    dA, dG = dA.clamp_min(0), dG.clamp_min(0)
    ok = torch.isfinite(QA).all() & torch.isfinite(QG).all() & torch.isfinite(dA).all() & torch.isfinite(dG).all()
    mask = torch.ones((), device=A.device)
    return {"QA": QA.float(), "dA": dA.float(), "QG": QG.float(), "dG": dG.float(), "mask": mask}, ok


def identity_kronecker(A: torch.Tensor, G: torch.Tensor, method: InverseMethod) -> dict[str, torch.Tensor]:
    """Inverse data that leaves the gradient unchanged (the plain-gradient fallback)."""
    if method is InverseMethod.CHOLESKY:
        return {"A_inv": _eye_like(A).float().clone(), "G_inv": _eye_like(G).float().clone()}
    # Q = I, unit eigenvalues and ``mask = 0`` (no damping term): 1 / (dG dA^T + mask * lambda) = 1.
    return {"QA": _eye_like(A).float().clone(), "dA": torch.ones(A.shape[:2], device=A.device),
            "QG": _eye_like(G).float().clone(), "dG": torch.ones(G.shape[:2], device=G.device),
            "mask": torch.zeros((), device=A.device)}


def unit_inverse(F: torch.Tensor, damping: float, dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(F_u + damping I)^{-1}`` for every unit, ``[units, k, k]``, and an ok flag."""
    F = F.to(dtype)
    inv, ok = _cholesky_inverse(F + damping * _eye_like(F))
    return {"F_inv": inv.float()}, ok


def invert_with_fallback(blocks: list, factors: list[dict[str, torch.Tensor]], damping: float | list[float],
                         method: InverseMethod) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Invert every block (fp32, then fp64, then 10x/100x damping, then identity).

    One host sync per attempt round (the ok flags of all blocks are read together).
    Returns the inverse data per block and the names of blocks that fell back to the plain gradient.
    """

    dampings = damping if isinstance(damping, list) else [damping] * len(blocks)

    def attempt(i: int, dtype: torch.dtype, scale: float):
        f, damp = factors[i], dampings[i] * scale
        if blocks[i].kind == "unit":
            return unit_inverse(f["F"], damp, dtype)
        # Retries drop the Woodbury rows (they may come from a non-finite batch) and use the dense A.
        rows = f.get("rows") if dtype is torch.float32 else None
        return kronecker_inverse(f["A"], f["G"], damp, method, dtype, rows=rows, n=f.get("n"))

    results: list = [None] * len(blocks)
    pending = list(range(len(blocks)))
    for dtype, damp in ((torch.float32, 1.0), (torch.float64, 1.0), (torch.float64, 10.0), (torch.float64, 100.0)):
        if not pending:
            break
        tries = {i: attempt(i, dtype, damp) for i in pending}
        flags = torch.stack([ok.reshape(()) for _, ok in tries.values()]).tolist()
        still = []
        for (i, (inv, _)), ok in zip(tries.items(), flags, strict=True):
            if ok:
                results[i] = inv
            else:
                still.append(i)
        pending = still
    failed = []
    for i in pending:
        failed.append(blocks[i].name)
        f = factors[i]
        if blocks[i].kind == "unit":
            results[i] = {"F_inv": _eye_like(f["F"]).float().clone()}
        else:
            results[i] = identity_kronecker(f["A"], f["G"], method)
    if failed:
        warnings.warn(f"K-FAC: inverting the curvature of {failed} failed in fp32, fp64 and with 100x damping; "
                      "these layers use the plain gradient until the next inverse update. Increase `damping`.",
                      RuntimeWarning, stacklevel=3)
    return results, failed
