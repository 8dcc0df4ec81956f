"""LARS and LAMB on the accelerator equal the CPU, on the foreach and the single-tensor paths."""

from __future__ import annotations

import pytest
import torch

from lightning_lbo import LAMB, LARS
from tests.gpu.conftest import assert_close_rel

STEPS = 5
# Elementwise updates and per-tensor norms: the fp32 floor of 5 steps is ~1e-7 relative; 1e-5 is 100x it.
REL = 1e-5
OPTIMIZERS = {
    "lars": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=1e-3)),
    "lars_paper_nesterov": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, momentum_form="paper",
                                       nesterov=True, clip=True)),
    "lamb": (LAMB, dict(lr=1e-2, weight_decay=1e-2)),
}


def _run(device: torch.device, name: str, foreach: bool, nan_step: int | None = None):
    """``STEPS`` steps on fixed weights and gradients (tensor 1's gradient is NaN at ``nan_step``)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (4, 3, 3, 3), (1,)]
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(params, foreach=foreach, **kwargs)
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(device)
        if step == nan_step:
            params[1].grad[0] = float("nan")
        opt.step()
    return params, opt


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_lars_lamb_steps_equal_cpu(device, name, foreach):
    """Five steps on the accelerator give the CPU's weights, on either path."""
    cpu, _ = _run(torch.device("cpu"), name, foreach)
    dev, _ = _run(device, name, foreach)
    for i, (a, b) in enumerate(zip(dev, cpu, strict=True)):
        assert a.device.type == device.type
        assert_close_rel(a, b, REL, f"{name} tensor {i}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_lars_lamb_nonfinite_tensor_skipped_and_counted_on_device(device, name):
    """A NaN gradient is skipped and counted on the device, and the weights stay equal to the CPU's."""
    cpu, cpu_opt = _run(torch.device("cpu"), name, True, nan_step=2)
    dev, dev_opt = _run(device, name, True, nan_step=2)
    count = dev_opt.nonfinite_skips
    assert count.device.type == device.type and int(count) == 1 == int(cpu_opt.nonfinite_skips)
    for i, (a, b) in enumerate(zip(dev, cpu, strict=True)):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, REL, f"{name} tensor {i}")
