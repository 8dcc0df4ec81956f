"""BatchNormStats callback: installed statistics, training unchanged, DDP, resume, eval-only and bad input."""

from __future__ import annotations

import csv
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.batchnorm_stats import BatchNormStats
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import PYTORCH_LIGHTNING, callback_bases, lightning_package
from lightning_lbo.data import TensorImageDataset, fashion_mnist_datamodule_class, tensor_loader
from lightning_lbo.models import SmallCNN
from tests.conftest import make_trainer
from tests.test_batchnorm import capture_bn_inputs, check_ddp_reduction, numpy_stats


def bn_model(dropout: bool = True) -> nn.Module:
    """BN on the input, conv-BN2d, linear-BN1d, (dropout), linear head with 2 classes."""
    layers = [nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
              nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.Dropout(0.3)] if dropout else []), nn.Linear(5, 2))


def synthetic_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen) * 2 + 1
    return TensorDataset(x, (x.mean((1, 2, 3)) > 1).long())


def module_for(pl, model: nn.Module, lr: float = 0.5, num_classes: int = 2):
    optimizer = sgd_factory(lr=lr, momentum=0.9)
    return classifier_module_class(pl.__name__)(model, optimizer=optimizer, num_classes=num_classes)


class LastInputsChecker(*callback_bases()):
    """Independent check: at each validation the running stats equal numpy's over the last k BN inputs."""

    def __init__(self, k: int) -> None:
        self.k, self.checked = k, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.layers = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.seen = [deque(maxlen=self.k) for _ in self.layers]
        for layer, seen in zip(self.layers, self.seen, strict=True):
            layer.register_forward_hook(lambda m, a, o, s=seen: s.append(a[0].detach().clone()) if m.training else None)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for layer, seen in zip(self.layers, self.seen, strict=True):
            inputs = list(seen)
            if trainer.world_size > 1:  # pool the other ranks' last inputs (BN-first layers only)
                inputs = list(trainer.strategy.all_gather(torch.cat(inputs)).unbind(0))
            mean, var = numpy_stats(inputs)
            np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-5, atol=1e-6)
            if trainer.world_size > 1:
                break
        self.checked += 1


def test_batchnorm_stats_bad_arguments():
    """Unknown mode, num_batches < 1 and a non-callable forward_fn fail at construction."""
    with pytest.raises(ValueError, match=r"Invalid mode: 'ema'. Supported: \('last_batches', 'precise'\)"):
        BatchNormStats(mode="ema")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="Invalid num_batches"):
            BatchNormStats(num_batches=bad)
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        BatchNormStats(forward_fn=3)
    assert BatchNormStats("precise").num_batches == 50 and BatchNormStats().num_batches == 1


def test_batchnorm_stats_last_batches_fashion_mnist_cnn(pl_package, tmp_path):
    """Last-batches mode installs the pooled stats of the last 2 training batches before each validation."""
    pl = pl_package
    dm = fashion_mnist_datamodule_class(pl.__name__)(batch_size=96, train_subset=384, eval_batch_size=256)
    module = module_for(pl, SmallCNN(channels=(4, 8, 8)), lr=0.2, num_classes=10)
    callback, checker = BatchNormStats(mode="last_batches", num_batches=2), LastInputsChecker(k=2)
    trainer = make_trainer(pl, tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[callback, checker])
    trainer.fit(module, datamodule=dm)
    assert checker.checked == 2
    assert callback.num_samples == 2 * 96 and callback.num_batches_used == 2


def test_batchnorm_stats_precise_equals_full_data(pl_package, tmp_path):
    """Precise mode installs the population statistics of all training data (fewer batches than asked: warned)."""
    pl = pl_package
    dm = fashion_mnist_datamodule_class(pl.__name__)(batch_size=64, train_subset=300)
    dm.setup("fit")
    train = tensor_loader(dm.train_set, 64, shuffle=False)  # fixed batches: the reference sees the same ones
    val = tensor_loader(TensorImageDataset(dm.test_set.images[:128], dm.test_set.labels[:128]), 128, shuffle=False)
    module = module_for(pl, SmallCNN(channels=(4, 8, 8)), lr=0.2, num_classes=10)
    callback = BatchNormStats(mode="precise", num_batches=8)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = make_trainer(pl, tmp_path, max_epochs=2, callbacks=[callback], logger=logger)
    with pytest.warns(UserWarning, match=r"has 5 batches per rank; used all of them \(5 batches, 300 samples"):
        trainer.fit(module, train, val)
    assert callback.num_samples == 300 and callback.num_batches_used == 5
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [row for row in csv.DictReader(fh) if row.get("batchnorm_stats/samples")]
    assert [float(row["batchnorm_stats/samples"]) for row in logged] == [300.0, 300.0]  # one per validation
    batches = [x for x, _ in train]
    layers = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == 3
    for layer, inputs in zip(layers, capture_bn_inputs(module.model, batches), strict=True):
        mean, var = numpy_stats(inputs)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-5, atol=1e-6)
    assert all(layer.momentum == 0.1 for layer in layers)  # BN settings restored after each estimation


@pytest.mark.parametrize("mode", ["last_batches", "precise"])
def test_batchnorm_stats_training_unchanged(tmp_path, mode):
    """Weights after fit (shuffled data, dropout, validation every epoch) are bitwise those without the callback."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    params = []
    for callbacks in ([], [BatchNormStats(mode=mode, num_batches=3)]):
        torch.manual_seed(0)
        module = module_for(pl, bn_model())
        train = DataLoader(synthetic_data(), batch_size=16, shuffle=True)
        val = DataLoader(synthetic_data(32, seed=1), batch_size=32)
        make_trainer(pl, tmp_path, max_epochs=2, callbacks=callbacks).fit(module, train, val)
        params.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


def test_batchnorm_stats_resume_keeps_window(tmp_path):
    """Resuming from a checkpoint installs the same last-3-batch statistics as an uninterrupted run."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    train = DataLoader(synthetic_data(), batch_size=32)

    def run(max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        module = module_for(pl, bn_model(dropout=False))
        trainer = make_trainer(pl, tmp_path, max_epochs=max_epochs, callbacks=[BatchNormStats(num_batches=3)])
        trainer.fit(module, train, ckpt_path=ckpt_path)
        return trainer, module

    _, straight = run(2)
    first, _ = run(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = run(2, ckpt_path=tmp_path / "epoch1.ckpt")
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_batchnorm_stats_eval_only(tmp_path):
    """trainer.validate without fit: last_batches warns, precise needs a loader and uses the one given."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    data = synthetic_data()
    val = DataLoader(synthetic_data(32, seed=1), batch_size=32)
    module = module_for(pl, bn_model())
    with pytest.warns(UserWarning, match="no training batches to take statistics from"):
        make_trainer(pl, tmp_path, callbacks=[BatchNormStats()]).validate(module, val)
    with pytest.raises(RuntimeError, match=r"pass BatchNormStats\(dataloader=<train loader>\)"):
        make_trainer(pl, tmp_path, callbacks=[BatchNormStats(mode="precise")]).validate(module, val)
    callback = BatchNormStats(mode="precise", num_batches=4, dataloader=DataLoader(data, batch_size=16))
    make_trainer(pl, tmp_path, callbacks=[callback]).validate(module, val)
    mean, var = numpy_stats([data.tensors[0]])
    np.testing.assert_allclose(module.model[0].running_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(module.model[0].running_var.numpy(), var, rtol=1e-5)
    assert callback.num_samples == 64
    module = module_for(pl, bn_model())  # a datamodule's train_dataloader() is used when there is one
    dm = pl.LightningDataModule.from_datasets(train_dataset=data, val_dataset=synthetic_data(32, seed=1), batch_size=16)
    make_trainer(pl, tmp_path, callbacks=[BatchNormStats(mode="precise")]).validate(module, datamodule=dm)
    np.testing.assert_allclose(module.model[0].running_var.numpy(), var, rtol=1e-5)


def test_batchnorm_stats_model_without_batchnorm_warns(tmp_path):
    """A model without BN gets a warning, not a crash."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    module = module_for(pl, nn.Sequential(nn.Flatten(), nn.Linear(72, 2)))
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[BatchNormStats(mode="precise")])
    with pytest.warns(UserWarning, match="has no BatchNorm layer with running statistics"):
        trainer.fit(module, DataLoader(synthetic_data(), batch_size=32), DataLoader(synthetic_data(8), batch_size=8))


class DDPPreciseChecker(*callback_bases()):
    """In each worker, after fit: precise stats of layer 0 equal numpy's over the whole data set."""

    def on_train_end(self, trainer, pl_module) -> None:
        assert self._last_batches.checked == 2
        precise = BatchNormStats(mode="precise", num_batches=100)
        stats = precise.refresh(trainer, pl_module)
        data = trainer.train_dataloader.dataset.tensors[0]
        assert stats.num_samples == data.shape[0] and stats.num_batches == 4
        mean, var = numpy_stats([data])
        bn = pl_module.model[0]
        np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-5)
        check_ddp_reduction(trainer.global_rank, trainer.world_size)  # the pure functions over the same group


def test_batchnorm_stats_ddp_spawn_two_ranks(tmp_path):
    """2 DDP ranks with different data: last-batch stats pooled over ranks; precise stats over all data.

    The workers also run :func:`tests.test_batchnorm.check_ddp_reduction` (pure functions, uneven batches).
    """
    pl = lightning_package(PYTORCH_LIGHTNING)
    checker, final = LastInputsChecker(k=1), DDPPreciseChecker()
    final._last_batches = checker
    module = module_for(pl, bn_model())
    trainer = make_trainer(pl, tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2,
                           callbacks=[BatchNormStats(), checker, final])
    trainer.fit(module, DataLoader(synthetic_data(), batch_size=16), DataLoader(synthetic_data(8), batch_size=4))


def test_batchnorm_stats_bf16_mixed(tmp_path):
    """Under bf16 autocast the low-precision BN inputs are pooled in float32: both modes install numpy's stats.

    In precise mode the checker's hooks see the estimation pass itself (BN layers in training mode), so
    its last 4 recorded inputs are the 4 batches of the pass, under the same autocast.
    """
    pl = lightning_package(PYTORCH_LIGHTNING)
    for mode, k in (("last_batches", 1), ("precise", 4)):
        module = module_for(pl, bn_model(dropout=False))
        checker = LastInputsChecker(k=k)
        trainer = make_trainer(pl, tmp_path, max_epochs=1, precision="bf16-mixed", num_sanity_val_steps=0,
                               callbacks=[BatchNormStats(mode=mode, num_batches=k), checker])
        trainer.fit(module, DataLoader(synthetic_data(), batch_size=16), DataLoader(synthetic_data(8), batch_size=8))
        assert checker.checked == 1
        assert checker.seen[1][-1].dtype == torch.bfloat16  # the conv output reaching BN really is low precision
