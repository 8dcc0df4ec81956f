"""K-FAC inside Lightning: configure_optimizers binding, KFACCallback binding/logging, accuracy vs SGD."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.kfac import KFACCallback
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import PYTORCH_LIGHTNING, package_of
from lightning_lbo.data import fashion_mnist_datamodule_class
from lightning_lbo.models import MLP
from lightning_lbo.optim.kfac import KFAC
from tests.conftest import make_trainer


def _fit_fashion_mnist(pl, tmp_path, factory, steps=10, batch_size=512):
    torch.manual_seed(0)
    module = classifier_module_class(PYTORCH_LIGHTNING)("cnn", optimizer=factory)
    dm = fashion_mnist_datamodule_class(PYTORCH_LIGHTNING)(batch_size=batch_size, train_subset=batch_size * steps,
                                                           drop_last=True, eval_batch_size=1000)
    trainer = make_trainer(pl, tmp_path, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    optimizer = trainer.optimizers[0]
    result = make_trainer(pl, tmp_path, limit_val_batches=3).validate(module, datamodule=dm, verbose=False)
    return result[0]["val_acc"], optimizer


def test_kfac_lightning_beats_sgd_on_fashion_mnist_after_few_large_batch_steps(tmp_path):
    """SmallCNN, batch 512, 10 steps: KFAC(self) in configure_optimizers beats momentum SGD on accuracy."""
    import pytorch_lightning as pl

    sgd_acc, _ = _fit_fashion_mnist(pl, tmp_path, sgd_factory(lr=0.1, momentum=0.9, weight_decay=0.0))
    kfac_acc, opt = _fit_fashion_mnist(pl, tmp_path, lambda m: KFAC(m, lr=0.1, momentum=0.9))
    assert isinstance(opt, KFAC) and opt.preconditioner.steps == 10
    assert kfac_acc > sgd_acc + 0.1, (kfac_acc, sgd_acc)


def _tiny_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_kfac_callback_binds_params_built_optimizer_and_logs(pl_package, tmp_path):
    """KFAC(params) (the LightningCLI form) is bound by KFACCallback; MC Fisher, accumulation, kfac/* logs."""
    module = classifier_module_class(package_of_pl(pl_package))(
        MLP(in_features=16, hidden=(8,), batch_norm=True, num_classes=2),
        optimizer=lambda m: KFAC(m.parameters(), lr=0.05, fisher="mc", factor_update_interval=1), num_classes=2)
    trainer = make_trainer(pl_package, tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0,
                           callbacks=[KFACCallback()])
    trainer.fit(module, train_dataloaders=_tiny_loader())
    opt = trainer.optimizers[0]
    assert opt.bound and opt.preconditioner.steps == 3
    assert all(st.refreshes[s] == 3 for st in opt.preconditioner.blocks for s in st.refreshes)
    metrics = trainer.callback_metrics
    for key in ("kfac/damping", "kfac/kl_clip_factor", "kfac/refreshes", "kfac/skipped_refreshes"):
        assert key in metrics, sorted(metrics)
    assert metrics["kfac/skipped_refreshes"] == 0
    assert package_of(trainer) == package_of_pl(pl_package)


def package_of_pl(pl) -> str:
    return "pytorch_lightning" if pl.__name__ == "pytorch_lightning" else "lightning.pytorch"
