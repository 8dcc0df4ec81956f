"""Every optimizer and every callback the package ships: steps that refresh nothing make no host sync and
build no tensor from host data (counted with tests/helpers/host_sync.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.compat import lightning_package
from lightning_lbo.optim.kfac import KFAC
from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup
from tests.conftest import make_trainer
from tests.helpers.host_sync import HostSyncCounter, batch_sync_recorder

WARMUP_STEPS = 2  # the first steps build optimizer state and Lightning's result tensors once


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _kfac(params_or_module, **kwargs):
    return KFAC(params_or_module, lr=0.05, momentum=0.9, factor_update_interval=3, inverse_update_interval=3, **kwargs)


OPTIMIZERS = {
    "LARS": lambda m: LARS(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
    "LARS-nesterov-clip": lambda m: LARS(m.parameters(), lr=0.1, nesterov=True, clip=True, weight_decay=1e-4),
    "LAMB": lambda m: LAMB(m.parameters(), lr=1e-3, weight_decay=1e-2),
    "LAMB-foreach": lambda m: LAMB(m.parameters(), lr=1e-3, weight_decay=1e-2, fused=False),
    "RMSpropWarmup": lambda m: RMSpropWarmup(m.parameters(), lr=0.1, steps_per_epoch=4, weight_decay=1e-4),
    "KFAC": _kfac,
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_host_sync_optimizer_steps_that_refresh_nothing(name):
    """Forward, backward and step of each optimizer: no sync, no host-built tensor after the warm-up steps
    (K-FAC: on the steps that refresh no factor or inverse)."""
    model = _net()
    opt = OPTIMIZERS[name](model)
    quiet = []
    for step in range(8):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        with HostSyncCounter() as counter:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        refresh = name == "KFAC" and step % 3 == 0
        if step >= WARMUP_STEPS and not refresh:
            quiet.append(counter.ops)
    assert len(quiet) >= 4 and quiet == [[]] * len(quiet), quiet


class _Module:
    """A LightningModule (built per package) that logs nothing itself: only the code under test may sync."""

    @staticmethod
    def build(package: str, optimizer):
        pl = lightning_package(package)

        class Tiny(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = _net()

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch[0], batch[1]
                return F.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return optimizer(self)

        return Tiny()


def _callbacks():
    from lightning_lbo.callbacks import (
        AdaptiveBatchSize,
        AdversarialTraining,
        BatchNormStats,
        FractionalEpoch,
        GradientNoiseScale,
        HessianSpectrum,
        KFACCallback,
        LRSchedule,
        NonFiniteBatchGuard,
    )
    from lightning_lbo.critical_batch import NoiseScaleTrace
    from lightning_lbo.recipes import ZeroGammaInit

    def _noise_scale_with_trace():
        gns = GradientNoiseScale(log_every_n_steps=5, probe_every_n_steps=None)
        return [gns, NoiseScaleTrace(gns)]

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)  # noqa: E731
    # name -> (callbacks, optimizer, trainer kwargs, is_busy(global_step)): busy steps may sync (refreshes, logs)
    never = lambda step: False  # noqa: E731
    return {
        "LRSchedule": (lambda: [LRSchedule(warmup_steps=3, warmup_start_factor=0.1, decay="cosine", total_steps=12,
                                           momentum_correction=True)], sgd, {}, never),
        "BatchNormStats": (lambda: [BatchNormStats()], sgd, {}, never),
        # logs at on_train_batch_end, after the step: the batch that started at global step 4 logs step 5
        "NonFiniteBatchGuard": (lambda: [NonFiniteBatchGuard(log_every_n_steps=5)], sgd, {},
                                lambda step: (step + 1) % 5 == 0),
        "GradientNoiseScale-accumulate": (lambda: [GradientNoiseScale(log_every_n_steps=5, probe_every_n_steps=None)],
                                          sgd, {"accumulate_grad_batches": 2}, lambda step: step % 5 == 0),
        "GradientNoiseScale-probe": (lambda: [GradientNoiseScale(log_every_n_steps=5, probe_every_n_steps=4)], sgd, {},
                                     lambda step: step % 4 == 0 or step % 5 == 0),
        "AdaptiveBatchSize": (lambda: [AdaptiveBatchSize(max_factor=2, duration=1, power_iters=2, scale_lr=False)],
                              sgd, {}, never),
        "HessianSpectrum": (lambda: [HessianSpectrum(every_n_epochs=1, max_iters=2, trace_samples=2, plot=False)],
                            sgd, {}, never),
        "AdversarialTraining": (lambda: [AdversarialTraining(ratio=0.5, epsilon=0.01, stop_fraction=1.0,
                                                                           data_range=(-4.0, 4.0))], sgd, {},
                                never),
        "FractionalEpoch": (lambda: [FractionalEpoch()], lambda m: RMSpropWarmup(m.parameters(), lr=0.1), {}, never),
        "GradientNoiseScale+NoiseScaleTrace": (_noise_scale_with_trace, sgd, {"accumulate_grad_batches": 2},
                                               lambda step: step % 5 == 0),
        "ZeroGammaInit": (lambda: [ZeroGammaInit()], sgd, {}, never),
        "KFACCallback": (lambda: [KFACCallback()], _kfac, {}, lambda step: step % 3 == 0),
        "KFACCallback-every-2": (lambda: [KFACCallback(log_every_n_steps=2)], partial(_kfac, kl_clip=1e-3), {},
                                 lambda step: step % 3 == 0),
    }


CALLBACK_CASES = list(_callbacks())


@pytest.mark.parametrize("case", CALLBACK_CASES)
def test_host_sync_callback_batches_that_refresh_nothing(case, tmp_path):
    """A Lightning fit with the callback: each training batch (forward, backward, step and every hook between
    the first callback's on_train_batch_start and the last one's on_train_batch_end) is sync-free unless the
    callback refreshes or logs on that step."""
    import pytorch_lightning as pl

    build_callbacks, optimizer, trainer_kwargs, busy = _callbacks()[case]
    first, last = batch_sync_recorder()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)),
                      batch_size=8)
    trainer = make_trainer(pl, tmp_path, max_steps=12 // trainer_kwargs.get("accumulate_grad_batches", 1),
                           limit_val_batches=0, log_every_n_steps=1000,
                           callbacks=[first, *build_callbacks(), last], **trainer_kwargs)
    trainer.fit(_Module.build("pytorch_lightning", optimizer), train_dataloaders=data)
    quiet = [(step, ops) for step, ops in first.batches if step >= WARMUP_STEPS and not busy(step)]
    assert len(quiet) >= 4, first.batches
    assert all(ops == [] for _, ops in quiet), quiet
    if case.startswith("KFACCallback"):  # the quiet steps include K-FAC's per-step logging
        assert "kfac/damping" in trainer.callback_metrics and "kfac/skipped_refreshes" in trainer.callback_metrics


def test_host_sync_baseline_fit_without_our_code_is_sync_free(tmp_path):
    """The harness itself: a plain SGD fit with no callback of ours counts nothing (else every case above would
    blame the callback for Lightning's own syncs), and a float logged every step is counted."""
    import pytorch_lightning as pl

    def fit(log_float: bool):
        first, last = batch_sync_recorder()
        module = _Module.build("pytorch_lightning", lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
        if log_float:
            step = module.training_step
            module.training_step = lambda batch, batch_idx: (module.log("x", 1.5, on_step=True, on_epoch=False),
                                                             step(batch, batch_idx))[1]
        data = DataLoader(TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,))), batch_size=8)
        trainer = make_trainer(pl, tmp_path, max_steps=6, limit_val_batches=0, log_every_n_steps=1000,
                               callbacks=[first, last])
        trainer.fit(module, train_dataloaders=data)
        return [ops for step, ops in first.batches if step >= WARMUP_STEPS]

    assert fit(False) == [[]] * 4
    assert all(ops for ops in fit(True))  # a host float in self.log: a host-built tensor every step


def test_host_sync_classifier_module_training_steps(tmp_path):
    """The package's own LightningModule (loss and accuracy logged every step) is sync-free per step too."""
    import pytorch_lightning as pl

    from lightning_lbo.classifier import ClassifierModule, sgd_factory
    from lightning_lbo.models import MLP

    first, last = batch_sync_recorder()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)),
                      batch_size=8)
    module = ClassifierModule(MLP(in_features=6, hidden=(8,), num_classes=3), optimizer=sgd_factory(lr=0.05),
                              num_classes=3)
    trainer = make_trainer(pl, tmp_path, max_steps=8, limit_val_batches=0, log_every_n_steps=1000,
                           callbacks=[first, last])
    trainer.fit(module, train_dataloaders=data)
    quiet = [ops for step, ops in first.batches if step >= WARMUP_STEPS]
    assert len(quiet) == 6 and quiet == [[]] * 6, quiet
