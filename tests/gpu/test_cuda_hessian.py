"""Hessian-vector products, top eigenvalues and the Hutchinson trace on the accelerator equal the CPU's."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lbo.hessian import HessianOperator, hutchinson_trace, random_vector, top_eigenvalues
from tests.gpu.conftest import assert_close_rel


def _operator(device: torch.device) -> HessianOperator:
    """An MLP with BN (eval mode: running statistics, set to non-trivial values) on two fixed batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=gen).to(device), torch.randint(0, 3, (n,), generator=gen).to(device))
               for n in (10, 6)]
    return HessianOperator(model.to(device), batches, cache_graph=False)


def test_cuda_hvp_equals_cpu(device):
    """H v for fixed probes matches the CPU to 1e-5 relative (fp32 double-backward, ~1e-7 floor)."""
    cpu, dev = _operator(torch.device("cpu")), _operator(device)
    assert dev.total_samples == cpu.total_samples == 16
    for seed in range(3):
        v = random_vector(cpu.numel, seed)
        hv = dev.matvec(v.to(device))
        assert hv.device.type == device.type
        assert_close_rel(hv, cpu.matvec(v), 1e-5, f"Hv (probe {seed})")


def test_cuda_top_eigenvalues_and_trace_equal_cpu(device):
    """Lanczos top-2 eigenvalues and the Hutchinson trace (same Rademacher probes) match the CPU."""
    cpu, dev = _operator(torch.device("cpu")), _operator(device)
    top_cpu = top_eigenvalues(cpu, k=2, method="lanczos", max_iters=30)
    top_dev = top_eigenvalues(dev, k=2, method="lanczos", max_iters=30)
    assert_close_rel(torch.tensor(top_dev.eigenvalues), torch.tensor(top_cpu.eigenvalues), 1e-4, "top-2 eigenvalues")
    trace_cpu = hutchinson_trace(cpu, max_samples=8, min_samples=8)
    trace_dev = hutchinson_trace(dev, max_samples=8, min_samples=8)
    assert_close_rel(torch.tensor(trace_dev.samples), torch.tensor(trace_cpu.samples), 1e-5, "trace probes")
