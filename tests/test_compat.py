"""Both Lightning distributions: the reference module/datamodule train under each Trainer."""

from __future__ import annotations

import pytest
import torch

from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import callback_bases, lightning_package, package_of
from lightning_lbo.data import fashion_mnist_datamodule_class
from tests.conftest import make_trainer


class CountingCallback(*callback_bases()):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def test_callback_is_a_callback_of_every_installed_package(pl_package):
    """One callback class satisfies isinstance for each installed Lightning's Callback."""
    assert isinstance(CountingCallback(), pl_package.Callback)


def test_classifier_trains_on_real_data_with_each_trainer(pl_package, tmp_path):
    """ClassifierModule + FashionMNISTDataModule + a package-neutral callback fit under each Trainer."""
    name = pl_package.__name__
    module = classifier_module_class(name)("mlp", optimizer=sgd_factory(lr=0.05), model_kwargs={"hidden": (32,)})
    dm = fashion_mnist_datamodule_class(name)(batch_size=256, train_subset=2048)
    callback = CountingCallback()
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[callback], limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    assert callback.batches == 8 and trainer.global_step == 8
    assert package_of(trainer) == name and package_of(module) == name
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert trainer.callback_metrics["val_acc"] > 0.3  # 8 SGD steps on real data beat chance (0.1) clearly


def test_package_lookup_errors():
    """Unknown packages and foreign objects get errors that say what is accepted."""
    with pytest.raises(ValueError, match="Supported"):
        lightning_package("lightning_pytorch")
    with pytest.raises(TypeError, match="pass a Lightning Trainer"):
        package_of(object())


def test_per_package_factories_return_one_class_however_called(pl_package):
    """f() and f("pytorch_lightning") give the same class (else ddp_spawn's pickling fails)."""
    import pickle

    from lightning_lbo.classifier import ClassifierModule

    assert classifier_module_class() is classifier_module_class("pytorch_lightning") is ClassifierModule
    assert fashion_mnist_datamodule_class() is fashion_mnist_datamodule_class("pytorch_lightning")
    cls = classifier_module_class(pl_package.__name__)
    assert pickle.loads(pickle.dumps(cls)) is cls
