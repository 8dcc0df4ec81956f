"""K-FAC on the accelerator equals K-FAC on the CPU: factors, steps, resume, bf16 autocast, skipped steps."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo import KFAC
from tests.gpu.accessors import layer_factors
from tests.gpu.conftest import assert_close_rel

STEPS = 4
# Tolerances are 10x the fp32 floor: the relative distance of these fp32 results to a float64 model's,
# measured on the CPU (factors up to 1.6e-5, weights up to 9e-6 after four steps).
FACTOR_REL, WEIGHT_REL = 1e-4, 1e-4
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, damping=1e-2, factor_update_interval=1, inverse_update_interval=2)


def _net() -> nn.Module:
    """Conv2d, BatchNorm2d (unit-wise block) and Linear: one layer of each K-FAC block kind."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: KFAC, batches, device: torch.device, autocast: bool = False) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()


def _run(device: torch.device, method: str = "cholesky", steps: int = STEPS, autocast: bool = False
         ) -> tuple[nn.Module, KFAC]:
    model = _net().to(device)
    opt = KFAC(model, inverse_method=method, **KW)
    _train(model, opt, _batches(steps), device, autocast)
    return model, opt


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_cuda_kfac_factors_and_steps_equal_cpu(device, method):
    """Four K-FAC steps (factors every step, inverses every 2) give the CPU's factors and weights."""
    cpu_model, cpu_opt = _run(torch.device("cpu"), method)
    dev_model, dev_opt = _run(device, method)
    cpu_factors, dev_factors = layer_factors(cpu_opt), layer_factors(dev_opt)
    assert dev_factors.keys() == cpu_factors.keys() and len(cpu_factors) == 3
    for layer, stats in cpu_factors.items():
        assert dev_factors[layer].keys() == stats.keys()
        for name, factor in stats.items():
            assert dev_factors[layer][name].device.type == device.type
            assert_close_rel(dev_factors[layer][name], factor, FACTOR_REL, f"{layer}.{name}")
    for (name, p_cpu), p_dev in zip(cpu_model.named_parameters(), dev_model.parameters(), strict=True):
        assert_close_rel(p_dev, p_cpu, WEIGHT_REL, name)


def test_cuda_kfac_resume_continues_exactly_and_across_devices(device):
    """A checkpoint taken on the accelerator resumes there bit for bit, and on the CPU like the CPU run."""
    batches = _batches(2 * STEPS)
    model = _net().to(device)
    opt = KFAC(model, **KW)
    _train(model, opt, batches[:STEPS], device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[STEPS:], device)
    for target in (device, torch.device("cpu")):
        buffer.seek(0)
        saved = torch.load(buffer, map_location=target, weights_only=False)
        resumed = _net().to(target)
        resumed.load_state_dict(saved["model"])
        resumed_opt = KFAC(resumed, **KW)
        resumed_opt.load_state_dict(saved["opt"])
        _train(resumed, resumed_opt, batches[STEPS:], target)
        for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
            if target == device:
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
            else:
                assert_close_rel(b, a, WEIGHT_REL, f"{name} resumed on the CPU")


def test_cuda_kfac_bf16_autocast_keeps_fp32_finite_factors(device):
    """Under bf16 autocast on the accelerator factors keep their dtype (fp32; fp64 for exact-damping blocks such as
    BatchNorm's unit-wise one), finite and close to the CPU's factors."""
    _, cpu_opt = _run(torch.device("cpu"), steps=1)
    _, opt = _run(device, steps=1, autocast=True)
    cpu_factors = layer_factors(cpu_opt)
    for layer, stats in layer_factors(opt).items():
        for name, factor in stats.items():
            want_dtype = cpu_factors[layer][name].dtype
            assert factor.dtype == want_dtype != torch.bfloat16 and torch.isfinite(factor).all(), f"{layer}.{name}"
            # bf16 keeps 8 mantissa bits: relative rounding 2^-9 per operand, a few of them per product.
            assert_close_rel(factor, cpu_factors[layer][name], 5e-2, f"{layer}.{name} (bf16 autocast)")


def test_cuda_kfac_nonfinite_step_counted_on_device_and_changes_nothing(device):
    """A NaN batch (on a refresh step) leaves weights, momentum and factors bit-identical; counted on the device."""
    model = _net().to(device)
    opt = KFAC(model, **KW)
    batches = _batches(3)
    _train(model, opt, batches[:2], device)
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    factors = layer_factors(opt)
    x, y = batches[2]
    _train(model, opt, [(torch.full_like(x, float("nan")), y)], device)
    count = opt.nonfinite_skips
    assert count.device.type == device.type and int(count) == 1
    for p, w, m in zip(model.parameters(), weights, momentum, strict=True):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
    for layer, stats in layer_factors(opt).items():
        for name, factor in stats.items():
            assert torch.equal(factor, factors[layer][name]), f"{layer}.{name} changed"
