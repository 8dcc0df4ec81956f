"""Hessian trace by Hutchinson's estimator with Rademacher probes.

.. math::

    \\operatorname{tr}(H) = \\mathbb{E}_v[v^\\top H v], \\qquad v_i \\in \\{-1, +1\\} \\text{ i.i.d.}

(Hutchinson 1990). Each probe costs one Hessian-vector product; the estimate is the mean of the
quadratic forms, its standard error the sample standard deviation over ``sqrt(n)``. The variance of one
Rademacher sample is ``2 * sum_{i != j} H_ij^2`` (lower than Gaussian probes' ``2 |H|_F^2``).
Probe ``i`` is drawn from a generator seeded with ``seed + i`` (identical on every rank and device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_lbo.hessian.eigen import random_vector
from lightning_lbo.hessian.hvp import HessianOperator, HVPBudgetExceeded


@dataclass
class TraceResult:
    """Trace estimate, its standard error (nan with one sample), probes used, whether ``tol`` was met."""

    trace: float
    std_error: float
    num_hvps: int
    converged: bool
    samples: list[float]


def hutchinson_trace(op: HessianOperator, max_samples: int = 100, tol: float = 1e-3, min_samples: int = 10,
                     seed: int = 0) -> TraceResult:
    """Hutchinson estimate of ``tr(H)``.

    Args:
        op: the Hessian operator.
        max_samples: probes at most (the operator's ``max_hvps`` may stop earlier).
        tol: stop once ``std_error <= tol * |trace|`` (after ``min_samples`` probes).
        min_samples: probes before the stopping rule is consulted.
        seed: probe ``i`` uses seed ``seed + i``.

    Example::

        result = hutchinson_trace(HessianOperator(model, [(x, y)]), max_samples=200)
    """
    if max_samples < 1 or min_samples < 1:
        raise ValueError(f"Invalid max_samples={max_samples} / min_samples={min_samples}; use positive integers.")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}; use a positive float.")
    start = op.num_hvps
    samples: list[float] = []
    converged = False
    for i in range(max_samples):
        v = random_vector(op.numel, seed + i, op.device, kind="rademacher", dtype=op.dtype)
        try:
            samples.append(float(torch.dot(op.matvec(v), v)))
        except HVPBudgetExceeded:
            break
        if len(samples) >= min_samples:
            mean, err = _mean_and_error(samples)
            if err <= tol * abs(mean):
                converged = True
                break
    if not samples:
        raise HVPBudgetExceeded("The HVP budget allows no Hutchinson probe.")
    mean, err = _mean_and_error(samples)
    return TraceResult(mean, err, op.num_hvps - start, converged, samples)


def _mean_and_error(samples: list[float]) -> tuple[float, float]:
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return mean, float("nan")
    var = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)
