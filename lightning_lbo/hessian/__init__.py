"""Hessian spectrum tools: HVPs, top eigenvalues, trace, density (pure torch, no Lightning import).

Example::

    from lightning_lbo.hessian import HessianOperator, top_eigenvalues, hutchinson_trace, slq_density

    op = HessianOperator(model, [(x, y)])            # eval-mode BN, all trainable parameters
    top = top_eigenvalues(op, k=3, method="lanczos")  # EigenResult
    trace = hutchinson_trace(op, max_samples=100)    # TraceResult
    density = slq_density(op, num_probes=2, steps=60)
"""

from lightning_lbo.hessian.density import SpectralDensity, lanczos_quadrature, slq_density
from lightning_lbo.hessian.eigen import (
                                         EigenResult,
                                         LanczosRun,
                                         lanczos,
                                         lanczos_eigenvalues,
                                         power_iteration,
                                         random_vector,
                                         top_eigenvalues,
                                         tridiagonal_eigh,
)
from lightning_lbo.hessian.hvp import (
                                         HessianOperator,
                                         HVPBudgetExceeded,
                                         batch_norm_mode,
                                         classifier_loss,
                                         first_dim_count,
                                         parameters_of,
                                         parameters_of_type,
                                         per_module_parameters,
)
from lightning_lbo.hessian.trace import TraceResult, hutchinson_trace

__all__ = [
    "EigenResult", "HVPBudgetExceeded", "HessianOperator", "LanczosRun", "SpectralDensity", "TraceResult",
    "batch_norm_mode", "classifier_loss", "first_dim_count", "hutchinson_trace", "lanczos", "lanczos_eigenvalues",
    "lanczos_quadrature", "parameters_of", "parameters_of_type", "per_module_parameters", "power_iteration",
    "random_vector", "slq_density", "top_eigenvalues", "tridiagonal_eigh",
]
