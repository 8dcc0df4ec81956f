"""BatchNormStats on the accelerator installs the CPU's statistics (precise BN and last batches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks import BatchNormStats
from lightning_lbo.classifier import ClassifierModule, sgd_factory
from lightning_lbo.compat import lightning_package
from tests.conftest import make_trainer
from tests.gpu.conftest import assert_close_rel

# Per-channel means and variances of a few hundred values: the fp32 floor is ~1e-7 relative.
REL = 1e-5


def _fit(device: torch.device, mode: str, tmp_path) -> list[torch.Tensor]:
    """Three training steps at lr 0 with ``BatchNormStats(mode)``; the installed running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 2, 6, 6, generator=gen) * 2 + 1
    loader = DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) > 1).long()), batch_size=16)
    module = ClassifierModule(model, optimizer=sgd_factory(lr=0.0, momentum=0.0, weight_decay=0.0), num_classes=2)
    trainer = make_trainer(lightning_package(), tmp_path, accelerator="gpu" if device.type == "cuda" else "cpu",
                           max_steps=3, callbacks=[BatchNormStats(mode=mode, num_batches=3)])
    trainer.fit(module, train_dataloaders=loader)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.running_mean.device.type == device.type for m in layers)
    return [t for m in layers for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("mode", ["precise", "last_batches"])
def test_cuda_batchnorm_stats_equal_cpu(device, mode, tmp_path):
    """The statistics installed at the end of training equal the CPU run's."""
    cpu = _fit(torch.device("cpu"), mode, tmp_path / "cpu")
    dev = _fit(device, mode, tmp_path / "dev")
    for i, (a, b) in enumerate(zip(dev, cpu, strict=True)):
        assert_close_rel(a, b, REL, f"{mode} statistic {i}")
