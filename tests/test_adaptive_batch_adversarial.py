"""ABSA's switch-off at a fraction of training, counted in batches within an epoch (not whole epochs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.adversarial_training import AdversarialTraining
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package
from tests.conftest import make_trainer


def test_adversarial_training_stops_mid_epoch_at_its_fraction(tmp_path):
    """stop_fraction 0.25 of 2 epochs of 8 batches: FGSM examples in batches 0-3 of epoch 0 only (1 of 4 each)."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    torch.manual_seed(0)
    module = classifier_module_class(pl.__name__)(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
                                                  num_classes=3, optimizer=sgd_factory(lr=0.1, weight_decay=0.0))
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)),
                        batch_size=4)
    adv = AdversarialTraining(ratio=0.25, epsilon=0.01, stop_fraction=0.25, data_range=(0.0, 1.0))
    per_batch = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            per_batch.append(adv.replaced - sum(per_batch))

    make_trainer(pl, tmp_path, max_epochs=2, callbacks=[adv, Count()]).fit(module, loader)
    assert per_batch == [1] * 4 + [0] * 12
