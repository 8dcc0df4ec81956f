"""K-FAC on the accelerator equals K-FAC on the CPU: factors, steps, resume, bf16 autocast, skipped steps."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_lbo import KFAC
from tests.gpu.accessors import kfac_batches, kfac_net, layer_factors, train_steps
from tests.gpu.conftest import assert_close_rel

STEPS = 4
# Tolerances are 10x the fp32 floor: the relative distance of these fp32 results to a float64 model's,
# measured on the CPU (factors up to 1.6e-5, weights up to 9e-6 after four steps).
FACTOR_REL, WEIGHT_REL = 1e-4, 1e-4
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, damping=1e-2, factor_update_interval=1, inverse_update_interval=2)


def _run(device: torch.device, method: str = "cholesky", steps: int = STEPS, autocast: bool = False
         ) -> tuple[nn.Module, KFAC]:
    model = kfac_net().to(device)
    opt = KFAC(model, inverse_method=method, **KW)
    train_steps(model, opt, kfac_batches(steps), device, autocast)
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
    batches = kfac_batches(2 * STEPS)
    model = kfac_net().to(device)
    opt = KFAC(model, **KW)
    train_steps(model, opt, batches[:STEPS], device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, batches[STEPS:], device)
    for target in (device, torch.device("cpu")):
        buffer.seek(0)
        saved = torch.load(buffer, map_location=target, weights_only=False)
        resumed = kfac_net().to(target)
        resumed.load_state_dict(saved["model"])
        resumed_opt = KFAC(resumed, **KW)
        resumed_opt.load_state_dict(saved["opt"])
        train_steps(resumed, resumed_opt, batches[STEPS:], target)
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
    model = kfac_net().to(device)
    opt = KFAC(model, **KW)
    batches = kfac_batches(3)
    train_steps(model, opt, batches[:2], device)
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    factors = layer_factors(opt)
    x, y = batches[2]
    train_steps(model, opt, [(torch.full_like(x, float("nan")), y)], device)
    count = opt.nonfinite_skips
    assert count.device.type == device.type and int(count) == 1
    for p, w, m in zip(model.parameters(), weights, momentum, strict=True):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
    for layer, stats in layer_factors(opt).items():
        for name, factor in stats.items():
            assert torch.equal(factor, factors[layer][name]), f"{layer}.{name} changed"
