"""Top eigenvalues of a Hessian operator: power iteration with deflation, and Lanczos.

Power iteration (the method of Yao et al. 2018 / PyHessian) repeats ``v <- H v / |H v|``; the Rayleigh
quotient ``v^T H v`` converges to the eigenvalue of largest *magnitude* at rate ``|lambda_2/lambda_1|``.
The k-th eigenpair is found the same way with ``v`` kept orthogonal to the k-1 eigenvectors already
found (deflation by projection). Stopping rule: relative change of the quotient below ``tol``.

Lanczos builds an orthonormal Krylov basis ``V`` with ``V^T H V = T`` tridiagonal; the extreme
eigenvalues of ``T`` (Ritz values) converge much faster than power iteration (rate governed by the
gap relative to the spectral width, as Chebyshev polynomials) and all top-k come from one run.
Full reorthogonalisation keeps ``V`` orthonormal in floating point. Lanczos returns the k
*algebraically largest* Ritz values; power iteration the k largest in magnitude (equal for the
usual Hessian of a trained network, whose spectrum is dominated by positive outliers).

Probe vectors come from an explicit ``torch.Generator`` seeded with ``seed`` on the CPU, so every rank
and every device draws the same vectors; they are drawn in float32 and cast to the operator's dtype
(:attr:`HessianOperator.dtype`, the model's), never in the default dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_lbo.hessian.hvp import HessianOperator, HVPBudgetExceeded

METHODS = ("power", "lanczos")


def random_vector(numel: int, seed: int, device: torch.device | str = "cpu", kind: str = "gaussian",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic probe ``[numel]`` of ``dtype``: ``"gaussian"`` N(0, 1) or ``"rademacher"`` +-1.

    Drawn in float32 whatever the default dtype, so a seed gives the same probe in every dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        v = torch.randn(numel, generator=gen, dtype=torch.float32)
    elif kind == "rademacher":
        v = torch.randint(0, 2, (numel,), generator=gen).float().mul_(2).sub_(1)
    else:
        raise ValueError(f"Invalid probe kind: {kind!r}. Supported: ('gaussian', 'rademacher').")
    return v.to(device=device, dtype=dtype)


def _orthogonalize(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    # Two passes of classical Gram-Schmidt ("twice is enough").
    if basis:
        q = torch.stack(basis)
        for _ in range(2):
            v = v - q.T @ (q @ v)
    return v


@dataclass
class EigenResult:
    """Eigenvalues (descending), their eigenvectors (flat), the HVPs used, and whether all converged."""

    eigenvalues: list[float]
    eigenvectors: list[torch.Tensor] = field(repr=False)
    num_hvps: int
    converged: bool


def power_iteration(op: HessianOperator, k: int = 1, max_iters: int = 100, tol: float = 1e-3, seed: int = 0
                    ) -> EigenResult:
    """Top-``k`` eigenpairs (largest magnitude) by power iteration with deflation.

    Args:
        op: the Hessian operator.
        k: number of eigenpairs.
        max_iters: products per eigenpair at most.
        tol: stop when ``|lambda_t - lambda_{t-1}| <= tol * |lambda_t|``.
        seed: seed of the starting vectors (eigenpair ``i`` uses ``seed + i``).

    If the operator's budget runs out, the estimates so far are returned with ``converged=False``.
    """
    _check(k, max_iters, tol)
    start = op.num_hvps
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    all_converged = True
    for i in range(k):
        v = _orthogonalize(random_vector(op.numel, seed + i, op.device, dtype=op.dtype), vectors)
        v = v / v.norm()
        value, converged = None, False
        try:
            for _ in range(max_iters):
                hv = _orthogonalize(op.matvec(v), vectors)
                new = float(torch.dot(hv, v))
                norm = hv.norm()
                if norm == 0:
                    value, converged = new, True
                    break
                v = hv / norm
                if value is not None and abs(new - value) <= tol * abs(new):
                    value, converged = new, True
                    break
                value = new
        except HVPBudgetExceeded:
            pass
        if value is None:
            break
        values.append(value)
        vectors.append(v)
        all_converged &= converged
        if not converged and op.remaining() == 0:
            break
    all_converged &= len(values) == k
    order = sorted(range(len(values)), key=lambda j: -values[j])
    return EigenResult([values[j] for j in order], [vectors[j] for j in order], op.num_hvps - start, all_converged)


@dataclass
class LanczosRun:
    """Tridiagonal ``alpha [m]`` (diagonal), ``beta [m-1]`` (off-diagonal), float64; the basis; the residual.

    ``residual`` is the norm of the next (unnormalised) Lanczos vector: a Ritz pair ``(theta, s)`` of
    the tridiagonal matrix has ``|H y - theta y| = residual * |s_m|``.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    basis: list[torch.Tensor] = field(repr=False)
    residual: float


def lanczos(op: HessianOperator, v0: torch.Tensor, steps: int, reorthogonalize: bool = True) -> LanczosRun:
    """``m <= steps`` Lanczos iterations from ``v0`` (fewer on an invariant subspace or an exhausted budget)."""
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps}; use a positive integer.")
    v = v0.to(device=op.device, dtype=op.dtype)
    v = v / v.norm()
    basis: list[torch.Tensor] = [v]
    alphas: list[float] = []
    betas: list[float] = []
    w_prev, beta, residual = None, 0.0, float("inf")
    for j in range(steps):
        try:
            w = op.matvec(v)
        except HVPBudgetExceeded:
            break
        alpha = torch.dot(w, v)
        w = w - alpha * v
        if w_prev is not None:
            w = w - beta * w_prev
        if reorthogonalize:
            w = _orthogonalize(w, basis)
        alphas.append(float(alpha))
        beta = residual = float(w.norm())
        if j == steps - 1 or len(basis) == op.numel or beta <= 1e-10 * max(1.0, abs(alphas[0])):
            if len(basis) == op.numel:
                residual = 0.0
            break
        betas.append(beta)
        w_prev, v = v, w / beta
        basis.append(v)
    m = len(alphas)
    if m == 0:
        raise HVPBudgetExceeded("The HVP budget allows no Lanczos step.")
    return LanczosRun(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas[: m - 1], dtype=torch.float64),
                      basis[:m], residual)


def tridiagonal_eigh(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix (alpha, beta)."""
    t = torch.diag(alpha)
    if beta.numel():
        t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def lanczos_eigenvalues(op: HessianOperator, k: int = 1, steps: int = 30, tol: float = 1e-3, seed: int = 0
                        ) -> EigenResult:
    """Top-``k`` (algebraically largest) eigenpairs from one Lanczos run of at most ``steps`` products.

    Convergence of each Ritz pair is judged by its residual bound ``beta_m |s_m| <= tol * |theta|``.
    """
    _check(k, steps, tol)
    start = op.num_hvps
    run = lanczos(op, random_vector(op.numel, seed, op.device, dtype=op.dtype), min(steps, op.numel))
    theta, s = tridiagonal_eigh(run.alpha, run.beta)
    q = torch.stack(run.basis)
    values, vectors, converged = [], [], True
    for idx in range(theta.numel() - 1, max(theta.numel() - k, 0) - 1, -1):
        values.append(float(theta[idx]))
        y = s[:, idx].to(q.dtype) @ q
        vectors.append(y / y.norm())
        converged &= run.residual * abs(float(s[-1, idx])) <= tol * max(abs(float(theta[idx])), 1e-12)
    return EigenResult(values, vectors, op.num_hvps - start, converged and len(values) == k)


def top_eigenvalues(op: HessianOperator, k: int = 1, method: str = "lanczos", max_iters: int = 100,
                    tol: float = 1e-3, seed: int = 0) -> EigenResult:
    """Top-``k`` Hessian eigenvalues by ``method`` ("lanczos" or "power"); ``max_iters`` bounds the products."""
    if method == "power":
        return power_iteration(op, k, max_iters, tol, seed)
    if method == "lanczos":
        return lanczos_eigenvalues(op, k, max_iters, tol, seed)
    raise ValueError(f"Invalid method: {method!r}. Supported: {METHODS}.")


def _check(k: int, iters: int, tol: float) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r}; use a positive integer.")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Invalid max_iters/steps: {iters!r}; use a positive integer.")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}; use a positive float.")
