"""Steps that refresh nothing make no host synchronisation (K-FAC step, LRSchedule's per-step LR logging)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks import LRSchedule
from lightning_lbo.optim.kfac import KFAC, StaleStatistics
from tests.conftest import make_trainer
from tests.helpers.host_sync import HostSyncCounter  # also imported from here by older tests


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


@pytest.mark.parametrize("kwargs", [
    dict(weight_decay=1e-3, momentum_correction=False, weight_rescaling=True),
    dict(inverse_method="eigen", fold_weight_decay=True, weight_decay=1e-3, fisher="mc"),
    dict(stale_statistics=StaleStatistics(threshold=0.5), factor_decay=0.5),
])
def test_kfac_steps_that_refresh_nothing_make_no_host_sync(kwargs):
    """Forward, backward and KFAC.step between refreshes: no .item(), no host-built tensor, no D2H copy."""
    torch.manual_seed(0)
    model = _net()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=3, inverse_update_interval=3, **kwargs)
    pre = opt.preconditioner
    quiet, busy = [], []
    for step in range(8):
        x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
        for group in opt.param_groups:
            group["lr"] = 0.1 / (1 + step)  # an LR schedule: momentum correction acts every step
        refreshes = sum(sum(b.refreshes.values()) for b in pre.blocks)
        with HostSyncCounter() as counter:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        refreshed = sum(sum(b.refreshes.values()) for b in pre.blocks) > refreshes or step % 3 == 0
        (busy if refreshed else quiet).append(counter.ops)
    assert len(quiet) >= 2 and all(ops == [] for ops in quiet), quiet
    assert any(busy)  # the counter sees the syncs refresh steps are allowed (inverse fallback flags)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs a CUDA device; "
                    "the CPU dispatch-mode test above covers this machine")
def test_kfac_steps_that_refresh_nothing_make_no_cuda_sync():
    """On CUDA, torch.cuda.set_sync_debug_mode('error') raises on any synchronising call between refreshes."""
    torch.manual_seed(0)
    model = _net().cuda()
    opt = KFAC(model, lr=0.1, momentum=0.9, weight_decay=1e-3, factor_update_interval=3, inverse_update_interval=3)
    for step in range(6):
        x, y = torch.randn(8, 1, 5, 5, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
        torch.cuda.set_sync_debug_mode("error" if step % 3 else "default")
        try:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


class _CountedLRSchedule(LRSchedule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.syncs: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with HostSyncCounter() as counter:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.syncs.append(counter.ops)


def test_lr_schedule_sets_and_logs_the_lr_without_host_sync(pl_package, tmp_path):
    """LRSchedule's per-step LR update and logging build no tensor from host data (a float log would)."""
    from lightning_lbo.classifier import classifier_module_class, sgd_factory
    from lightning_lbo.compat import package_of
    from lightning_lbo.models import MLP

    name = "pytorch_lightning" if pl_package.__name__ == "pytorch_lightning" else "lightning.pytorch"
    module = classifier_module_class(name)(MLP(in_features=4, hidden=(4,), num_classes=2),
                                           optimizer=sgd_factory(lr=0.1, momentum=0.9), num_classes=2)
    schedule = _CountedLRSchedule(warmup_steps=2, warmup_start_factor=0.1, decay="cosine", total_steps=4,
                                  momentum_correction=True)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    trainer = make_trainer(pl_package, tmp_path, max_steps=4, limit_val_batches=0, callbacks=[schedule])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8))
    assert package_of(trainer) == name
    # the first step's log creates Lightning's result tensors once; every later step must be sync-free
    assert len(schedule.syncs) == 4 and all(ops == [] for ops in schedule.syncs[1:]), schedule.syncs
    assert "lr/pg0" in trainer.callback_metrics
