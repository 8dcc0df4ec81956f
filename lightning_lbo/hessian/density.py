"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v`` and ``m`` Lanczos steps with tridiagonal ``T = S diag(theta) S^T``, Gauss
quadrature gives

.. math::

    v^\\top f(H) v \\approx \\sum_{j=1}^{m} s_{1j}^2 f(\\theta_j),

exact for polynomials ``f`` of degree up to ``2m - 1``. With ``v`` Gaussian (normalised),
``E[v^T f(H) v] = tr f(H) / n``, so the spectral density ``phi(t) = (1/n) sum_i delta(t - lambda_i)``
is estimated by the average over ``n_v`` probes of the weighted nodes ``(theta_j, s_1j^2)``, smoothed
with a Gaussian kernel of width ``sigma`` (Lin, Saad, Yang 2016; Ghorbani et al. 2019;
PyHessian, Yao et al. 2020). Nodes and weights are returned raw so any smoothing can be applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_lbo.hessian.eigen import lanczos, random_vector, tridiagonal_eigh
from lightning_lbo.hessian.hvp import HessianOperator


@dataclass
class SpectralDensity:
    """Quadrature nodes ``[n_v, m]`` and weights ``[n_v, m]`` (each row sums to 1), float64.

    Rows of runs that stopped early (invariant subspace) are padded with weight 0.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_hvps: int

    def moment(self, p: int) -> float:
        """Estimate of ``tr(H^p) / n``."""
        return float((self.weights * self.nodes.pow(p)).sum(1).mean())

    def evaluate(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The Gaussian-smoothed density on ``grid`` ``[g]`` (integrates to ~1); default ``sigma``: 1% of the range."""
        grid = grid.to(torch.float64)
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = max(span, 1e-12) * 0.01
        diff = grid[:, None, None] - self.nodes[None]
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * (2 * torch.pi) ** 0.5)
        return (kernel * self.weights[None]).sum(-1).mean(-1)

    def grid(self, points: int = 200, margin: float = 0.05) -> torch.Tensor:
        """An evenly spaced grid over the nodes' range, widened by ``margin`` of it on each side."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        pad = max(hi - lo, 1e-12) * margin
        return torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)


def lanczos_quadrature(op: HessianOperator, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes and weights ``[m]`` of the probe ``v`` (normalised inside)."""
    run = lanczos(op, v, min(steps, op.numel))
    theta, s = tridiagonal_eigh(run.alpha, run.beta)
    return theta, s[0].pow(2)


def slq_density(op: HessianOperator, num_probes: int = 1, steps: int = 80, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``num_probes`` Gaussian probes and ``steps`` Lanczos steps each.

    Example::

        density = slq_density(HessianOperator(model, [(x, y)]), num_probes=2, steps=60)
        phi = density.evaluate(density.grid())
    """
    if num_probes < 1 or steps < 1:
        raise ValueError(f"Invalid num_probes={num_probes} / steps={steps}; use positive integers.")
    start = op.num_hvps
    width = min(steps, op.numel)
    nodes = torch.zeros(num_probes, width, dtype=torch.float64)
    weights = torch.zeros(num_probes, width, dtype=torch.float64)
    for i in range(num_probes):
        theta, w = lanczos_quadrature(op, random_vector(op.numel, seed + i, op.device, dtype=op.dtype), width)
        nodes[i, : theta.numel()] = theta
        nodes[i, theta.numel():] = theta[-1]
        weights[i, : w.numel()] = w
    return SpectralDensity(nodes, weights, op.num_hvps - start)
