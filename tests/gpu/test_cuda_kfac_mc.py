"""K-FAC's MC Fisher on the accelerator: labels drawn on the logits' device, NaN batches skipped, exact resume."""

from __future__ import annotations

import io

import torch

from lightning_lbo import KFAC
from tests.gpu.accessors import kfac_batches, kfac_net, layer_factors, train_steps

KW = dict(lr=0.1, momentum=0.9, damping=1e-2, fisher="mc", factor_update_interval=1, inverse_update_interval=2)


def test_cuda_kfac_mc_nan_batch_skipped_with_labels_drawn_on_the_device(device):
    """fisher='mc' on the accelerator: the label generator lives on the logits' device; a NaN batch on a
    refresh step raises nothing (no multinomial device assert) and changes no weight, momentum or factor."""
    model = kfac_net().to(device)
    opt = KFAC(model, **KW)
    batches = kfac_batches(3)
    train_steps(model, opt, batches[:2], device)
    generators = opt.preconditioner.label_sampler._generators
    assert [d.type for d in generators] == [device.type] and all(g.device.type == device.type
                                                                  for g in generators.values())
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    factors = layer_factors(opt)
    x, y = batches[2]
    train_steps(model, opt, [(torch.full_like(x, float("nan")), y)], device)
    assert int(opt.nonfinite_skips) == 1 and int(opt.preconditioner.skipped_refreshes) >= 1
    for p, w, m in zip(model.parameters(), weights, momentum, strict=True):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
    for layer, stats in layer_factors(opt).items():
        for name, factor in stats.items():
            assert torch.equal(factor, factors[layer][name]), f"{layer}.{name} changed"


def test_cuda_kfac_mc_resume_continues_bit_for_bit(device):
    """MC run checkpointed on the accelerator, resumed there under another global seed == the uninterrupted run."""
    batches = kfac_batches(6)
    model = kfac_net().to(device)
    opt = KFAC(model, **KW)
    train_steps(model, opt, batches[:3], device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, batches[3:], device)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=device, weights_only=False)
    resumed = kfac_net().to(device)
    resumed.load_state_dict(saved["model"])
    torch.manual_seed(1234)  # the resumed labels come from the checkpoint, not from the global seed
    resumed_opt = KFAC(resumed, **KW)
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, batches[3:], device)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
