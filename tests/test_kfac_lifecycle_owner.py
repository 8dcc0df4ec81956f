"""One owner of K-FAC's Lightning lifecycle: KFACCallback, in every Trainer through the callbacks entry point."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.kfac import KFACCallback
from lightning_lbo.callbacks.kfac_lifecycle import KFACLifecycle
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.models import MLP
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from tests.conftest import make_trainer
from tests.helpers.ddp import spawn_gloo

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def _kfac_callbacks(trainer):
    return [c for c in trainer.callbacks if isinstance(c, KFACLifecycle)]


def _data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)),
                      batch_size=8)


def _module(package, optimizer):
    return classifier_module_class(package)(MLP(in_features=4, hidden=(8,), num_classes=2), num_classes=2,
                                            optimizer=optimizer)


def test_kfac_callbacks_entry_point_is_installed_for_both_packages():
    """pyproject.toml's callbacks_factory entry points are in the installed metadata (make install)."""
    for package in PACKAGES:
        names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=f"{package}.callbacks_factory")}
        factory = "callbacks_factory_" + package.split(".")[0]
        assert names.get("lightning_lbo_kfac") == f"lightning_lbo.callbacks.kfac_lifecycle:{factory}", package


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_is_in_every_trainer_and_attaches_a_bare_kfac(package, tmp_path):
    """A Trainer built without callbacks has one KFACCallback; it binds KFAC(params) (nothing else would)."""
    pl = pytest.importorskip(package)
    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0)
    assert len(_kfac_callbacks(trainer)) == 1
    module = _module(package, lambda m: KFAC(m.parameters(), lr=0.05, factor_update_interval=1))
    trainer.fit(module, train_dataloaders=_data())
    pre = trainer.optimizers[0].preconditioner
    assert pre.bound and pre.steps == 2
    assert not pre.capture.hooked  # teardown: hooks removed at the end of fit
    assert not any(k.startswith("kfac/") for k in trainer.callback_metrics)  # the automatic one logs nothing


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_passed_explicitly_is_the_only_one(package, tmp_path):
    """With the user's KFACCallback, the run has exactly one (the user's: it logs), and K-FAC is attached once."""
    pl = pytest.importorskip(package)
    mine = KFACCallback()
    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0, callbacks=[mine])
    module = _module(package, lambda m: KFAC(m, lr=0.05, factor_update_interval=1))
    calls = []
    original = KFACPreconditioner.bind

    def counting_bind(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    KFACPreconditioner.bind = counting_bind
    try:
        trainer.fit(module, train_dataloaders=_data())
    finally:
        KFACPreconditioner.bind = original
    assert _kfac_callbacks(trainer) == [mine]
    assert "kfac/damping" in trainer.callback_metrics
    assert len(calls) == 1  # KFAC(self) binds at construction; the callback's attach finds it bound


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_without_kfac_optimizer_is_silent(package, tmp_path):
    """A first-order run trains as before with the automatic callback; an explicit one still names the fix."""
    pl = pytest.importorskip(package)
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(_module(package, sgd_factory(lr=0.1)), train_dataloaders=_data())
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0, callbacks=[KFACCallback()])
    with pytest.raises(RuntimeError, match="found no KFAC optimizer"):
        trainer.fit(_module(package, sgd_factory(lr=0.1)), train_dataloaders=_data())


def _bare_preconditioner_on_two_ranks(rank, world_size):
    from torch import nn

    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = nn.Linear(4, 2)
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_interval=1)
    with pytest.raises(RuntimeError, match=r"2 ranks with no communicator.*set_communicator\(default_communicator"):
        model(torch.randn(8, 4)).sum().backward()  # the first captured statistic
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_interval=1)
    pre.set_communicator(default_communicator())
    model.zero_grad()
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))).sum().backward()
    pre.step()
    a = pre.factors(model)["A"].clone()
    gathered = [torch.empty_like(a) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, a)
    assert torch.equal(gathered[0], gathered[1])  # the injected communicator averaged the factors


def test_kfac_outside_lightning_on_two_ranks_needs_an_injected_communicator():
    """The core never builds a communicator itself: on 2 ranks without one it raises, naming the fix."""
    spawn_gloo(_bare_preconditioner_on_two_ranks, world_size=2)


def test_kfac_automatic_callback_unpickles_in_a_fresh_interpreter():
    """ddp_spawn pickles the Trainer's callbacks: the automatic one loads in a worker that has not built it."""
    import pickle
    import subprocess
    import sys

    from lightning_lbo.callbacks import kfac_lifecycle

    for factory in (kfac_lifecycle.callbacks_factory_pytorch_lightning, kfac_lifecycle.callbacks_factory_lightning):
        code = "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); assert c._automatic, c"
        subprocess.run([sys.executable, "-c", code], input=pickle.dumps(factory()[0]), check=True)
