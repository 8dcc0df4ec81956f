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


# ---------------------------------------------------------------- private names, read only through compat
def test_compat_private_lightning_names_exist_on_the_installed_version(pl_package, tmp_path):
    """Each private Lightning name compat.py reads exists on this version (a release that moves one fails here)."""
    import importlib
    import inspect
    from datetime import timedelta

    from lightning_lbo.compat import (
        DDP_REGISTER_HOOKS,
        ddp_comm_hook_settings,
        strategy_timeout,
        unwrap_optimizer,
        uses_distributed_sampler,
    )
    from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

    name = pl_package.__name__
    assert callable(importlib.import_module(f"{name}.overrides.distributed")._register_ddp_comm_hook)

    def hook(state, bucket):  # a DDP comm hook's signature
        return bucket

    ddp = pl_package.strategies.DDPStrategy
    strategy = ddp(timeout=timedelta(seconds=7), ddp_comm_hook=hook)
    assert strategy_timeout(strategy) == timedelta(seconds=7)
    assert ddp_comm_hook_settings(strategy) == (hook, None, None)
    # the method ddp_kfac overrides still exists and DDP's setup still calls it (else the override is dead code)
    assert callable(getattr(ddp, DDP_REGISTER_HOOKS)) and DDP_REGISTER_HOOKS in inspect.getsource(ddp.configure_ddp)
    kfac_class = kfac_ddp_strategy_class(name)
    assert getattr(kfac_class, DDP_REGISTER_HOOKS) is kfac_class._register_comm_hook_on_every_device

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(pl_package.core.optimizer.LightningOptimizer(sgd)) is sgd and unwrap_optimizer(sgd) is sgd

    for flag in (True, False):
        trainer = make_trainer(pl_package, tmp_path, use_distributed_sampler=flag)
        assert uses_distributed_sampler(trainer) is flag

    from lightning_lbo.compat import callback_state_key

    assert callback_state_key(CountingCallback(), every=2) == "CountingCallback{'every': 2}"


def test_compat_private_torch_names_exist_on_the_installed_version():
    """torch's private norm base class, behind compat.batch_norm_base: every layer with running statistics."""
    from lightning_lbo.compat import batch_norm_base

    base = batch_norm_base()
    layers = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.InstanceNorm2d,
              torch.nn.LazyBatchNorm1d)
    assert all(issubclass(layer, base) for layer in layers)
    assert not issubclass(torch.nn.LayerNorm, base) and not issubclass(torch.nn.GroupNorm, base)


def test_compat_map_tensors_reaches_every_tensor_and_keeps_other_leaves():
    """torch's private pytree map, behind compat.map_tensors: nested tuples, lists, dicts, namedtuples."""
    from collections import namedtuple

    from lightning_lbo.compat import map_tensors

    pair = namedtuple("Pair", "x y")
    tree = {"a": (torch.ones(2), 3, "s"), "b": [pair(torch.zeros(1), None)]}
    out = map_tensors(lambda t: t + 1, tree)
    assert torch.equal(out["a"][0], torch.full((2,), 2.0)) and out["a"][1:] == (3, "s")
    assert isinstance(out["b"][0], pair) and torch.equal(out["b"][0].x, torch.ones(1)) and out["b"][0].y is None


def test_compat_is_the_only_module_that_reads_private_lightning_names():
    """The private Lightning names (and torch's outside the K-FAC core) appear in compat.py only."""
    import re

    from tests.helpers.ddp import REPO_ROOT

    private = re.compile(r"\b_register_ddp_comm_hook\b|\._accelerator_connector\b|[\"']_optimizer[\"']|"
                         r"(?<!self)\._optimizer\b|\._timeout\b|\._ddp_comm_(hook|state|wrapper)\b|"
                         r"\b_register_ddp_hooks\b|torch\.utils\._pytree|\._generate_state_key\b|\._buffers\b|"
                         r"\b_NormBase\b|\._scale\b|[\"']_scale[\"']")
    offenders = []
    for path in sorted((REPO_ROOT / "lightning_lbo").rglob("*.py")):
        if path.name == "compat.py" or "optim" in path.relative_to(REPO_ROOT / "lightning_lbo").parts[:1]:
            continue  # the adapter itself; optim/ is pure torch and has its own adapter (_torch_private.py)
        offenders += [f"{path.relative_to(REPO_ROOT)}:{n}: {m.group(0)}" for n, line in
                      enumerate(path.read_text().splitlines(), start=1) if (m := private.search(line))]
    assert not offenders, offenders
