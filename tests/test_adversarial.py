"""FGSM / AdversarialTraining: loss goes up, BN statistics untouched, ratio halves with ABS, switch-off."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.adversarial import fgsm, replace_with_adversarial
from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_lbo.callbacks.adversarial_training import AdversarialTraining
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from tests.conftest import make_trainer

RANGE = (-1.0, 2.0)


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def images(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=gen) * 3 - 1, torch.randint(0, 3, (n,), generator=gen)


def test_fgsm_increases_loss_stays_in_range_and_leaves_bn_untouched():
    """x + eps sign(grad) raises the eval loss, respects eps and the range; BN buffers, flags, grads unchanged."""
    model = conv_bn_net().train()
    x, y = images()
    model(x)  # give BN non-trivial running statistics
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = fgsm(model, x, y, epsilon=0.05, data_range=RANGE)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= RANGE[0] and x_adv.max() <= RANGE[1]
    model.eval()
    with torch.no_grad():
        clean = nn.functional.cross_entropy(model(x), y)
        adv = nn.functional.cross_entropy(model(x_adv), y)
        random = nn.functional.cross_entropy(model((x + 0.05 * torch.randn_like(x).sign()).clamp(*RANGE)), y)
    assert adv > clean and adv > random
    with pytest.raises(ValueError, match="Invalid data_range"):
        fgsm(model, x, y, 0.1, (1.0, 0.0))


def test_replace_with_adversarial_overwrites_the_first_fraction_in_place():
    """ratio 0.25 of 32 samples: the first 8 change (to the FGSM examples), the rest stay."""
    model = conv_bn_net()
    x, y = images()
    original = x.clone()
    n = replace_with_adversarial(model, x, y, ratio=0.25, epsilon=0.05, data_range=RANGE)
    assert n == 8
    assert torch.equal(x[8:], original[8:]) and not torch.equal(x[:8], original[:8])
    torch.testing.assert_close(x[:8], fgsm(model, original[:8], y[:8], 0.05, RANGE))


def test_adversarial_training_ratio_halves_with_abs_and_switches_off(pl_package, tmp_path):
    """With ABS doubling after epoch 1: 2 per batch of 8 at accumulation 1, 1 at accumulation 2, none after half."""
    module = classifier_module_class(pl_package.__name__)(conv_bn_net(), num_classes=3,
                                                          optimizer=sgd_factory(lr=0.05, weight_decay=0.0))
    x, y = images(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 batches per epoch
    script = [8.0, 1.0, 0.4, 0.1, 0.1, 0.1]
    abs_cb = AdaptiveBatchSize(max_accumulation=4, eigenvalue_fn=lambda t, m: script[t.current_epoch],
                               scale_lr="linear")
    adv = AdversarialTraining(ratio=0.25, epsilon=0.01, stop_fraction=0.5, data_range=RANGE)
    counts = []

    class Count(pl_package.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            counts.append(adv.replaced - sum(counts))

    trainer = make_trainer(pl_package, tmp_path, max_epochs=6, callbacks=[abs_cb, adv, Count()])
    trainer.fit(module, loader)
    # epochs 0-1: accumulation 1, ratio 0.25 -> 2 of 8 per batch; epoch 2: accumulation 2 (epoch 1's 1.0 <= 8 / 2),
    # ratio 0.125 -> 1 of 8; epochs 3-5: past stop_fraction 0.5 of 6 epochs -> none.
    assert counts == [8, 8, 4, 0, 0, 0]
    assert abs_cb.accumulation == 4
    with pytest.raises(ValueError, match="Invalid ratio"):
        AdversarialTraining(ratio=0.0)


def test_adversarial_training_needs_a_data_range(tmp_path):
    """Without data_range and a datamodule that has one, setup says how to fix it."""
    import pytorch_lightning as pl

    module = classifier_module_class("pytorch_lightning")(conv_bn_net(), num_classes=3)
    x, y = images(8)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[AdversarialTraining()])
    with pytest.raises(ValueError, match="data_range"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))


def test_adversarial_ratio_follows_any_rule(tmp_path):
    """ABSA's halving composes with a ramp (no Hessian): ratio 0.25 -> 0.125 when the batch doubles."""
    import pytorch_lightning as pl

    from lightning_lbo.batch_rules import RampRule

    module = classifier_module_class("pytorch_lightning")(conv_bn_net(), num_classes=3,
                                                          optimizer=sgd_factory(lr=0.05, weight_decay=0.0))
    x, y = images(32)
    abs_cb = AdaptiveBatchSize(rule=RampRule({0: 1, 1: 2}), scale_lr="linear")
    adv = AdversarialTraining(ratio=0.25, epsilon=0.01, stop_fraction=1.0, data_range=RANGE, stop_at_max_batch=False)
    trainer = make_trainer(pl, tmp_path, max_epochs=2, callbacks=[abs_cb, adv])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert adv.replaced == 4 * 2 + 4 * 1  # 4 batches of 8 per epoch: 2 each, then 1 each
