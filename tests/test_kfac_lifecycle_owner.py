"""K-FAC's Lightning lifecycle owner: KFACCallback, only where the user asked for K-FAC.

A Trainer gets nothing from lightning_lbo unless it asks: no entry point adds a callback. The user passes
``KFACCallback()``, or ``strategy="ddp_kfac"`` adds a silent one. Where K-FAC needs the callback and has
none (an AMP scale, several ranks, ``KFAC(params)``), it fails at its first step naming the callback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.kfac import KFACCallback
from lightning_lbo.callbacks.kfac_lifecycle import KFACLifecycle
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.models import MLP
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class
from tests.conftest import make_trainer
from tests.helpers.ddp import REPO_ROOT, ddp_env, spawn_gloo

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


@pytest.fixture
def single_process_group():
    """ddp_kfac on one CPU device initialises a process group; destroy it so later tests see none."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _kfac_callbacks(trainer):
    return [c for c in trainer.callbacks if isinstance(c, KFACLifecycle)]


def _data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)),
                      batch_size=8)


def _module(package, optimizer):
    return classifier_module_class(package)(MLP(in_features=4, hidden=(8,), num_classes=2), num_classes=2,
                                            optimizer=optimizer)


def test_kfac_lifecycle_pyproject_declares_no_callbacks_entry_point():
    """pyproject.toml registers no Lightning callbacks factory (the wiring a user did not write)."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert "callbacks_factory" not in pyproject and "kfac_lifecycle:" not in pyproject


_FRESH_FIT = """
import sys
import lightning_lbo  # registers the strategies, as a user's import would
import torch
from torch.utils.data import DataLoader, TensorDataset
pl = __import__("{package}", fromlist=["Trainer"])

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[1])
trainer.fit(Tiny(), train_dataloaders=data)
ours = [type(c).__module__ for c in trainer.callbacks if type(c).__module__.startswith("lightning_lbo")]
assert not ours, ours
core = sorted(m for m in sys.modules if m.startswith("lightning_lbo.optim.kfac"))
assert not core, core
print("FIT DONE")
"""


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_lifecycle_trainer_without_kfac_gets_nothing_from_us(package, tmp_path):
    """A fresh interpreter: an SGD fit gets no lightning_lbo callback, imports no K-FAC core, prints no line of ours."""
    pytest.importorskip(package)
    env = ddp_env()
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", _FRESH_FIT.format(package=package), str(tmp_path)], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "FIT DONE" in proc.stdout
    for word in ("lightning_lbo", "KFAC", "entry point"):
        assert word not in output, output


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_passed_explicitly_attaches_a_bare_kfac_and_logs(package, tmp_path):
    """The user's KFACCallback binds KFAC(params) (nothing else would), logs kfac/*, and removes hooks at the end."""
    pl = pytest.importorskip(package)
    mine = KFACCallback()
    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0, callbacks=[mine])
    trainer.fit(_module(package, lambda m: KFAC(m.parameters(), lr=0.05, factor_update_interval=1)),
                train_dataloaders=_data())
    pre = trainer.optimizers[0].preconditioner
    assert pre.bound and pre.steps == 2
    assert not pre.capture.hooked  # teardown: hooks removed at the end of fit
    assert _kfac_callbacks(trainer) == [mine]
    assert "kfac/damping" in trainer.callback_metrics and "kfac/refreshes" in trainer.callback_metrics


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_absent_kfac_from_params_fails_naming_the_callback(package, tmp_path):
    """KFAC(params) with no KFACCallback: the first step fails and names the callback (no silent SGD)."""
    pl = pytest.importorskip(package)
    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0)
    assert _kfac_callbacks(trainer) == []
    with pytest.raises(RuntimeError, match=r"not bound.*callbacks=\[KFACCallback\(\)\]"):
        trainer.fit(_module(package, lambda m: KFAC(m.parameters(), lr=0.05)), train_dataloaders=_data())


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_passed_explicitly_is_the_only_one(package, tmp_path):
    """With the user's KFACCallback, the run has exactly one, and K-FAC is attached once."""
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
    assert len(calls) == 1  # KFAC(self) binds at construction; the callback's attach finds it bound


@pytest.mark.parametrize("package", PACKAGES)
def test_kfac_callback_without_kfac_optimizer_names_the_fix(package, tmp_path):
    """A first-order run with an explicit KFACCallback fails at fit start, naming the fix."""
    pl = pytest.importorskip(package)
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0, callbacks=[KFACCallback()])
    with pytest.raises(RuntimeError, match="found no KFAC optimizer"):
        trainer.fit(_module(package, sgd_factory(lr=0.1)), train_dataloaders=_data())


def test_kfac_callback_state_is_not_checkpointed():
    """Logging cadence is configuration: a resumed run keeps the cadence it was built with."""
    callback = KFACCallback(log_every_n_steps=7)
    assert callback.state_dict() == {}
    callback.load_state_dict({"log_every_n_steps": 1})
    assert callback.log_every_n_steps == 7
    with pytest.raises(ValueError, match="log_every_n_steps"):
        KFACCallback(log_every_n_steps=True)


def test_ddp_kfac_adds_a_silent_kfac_callback_when_none_is_passed(tmp_path, single_process_group):
    """strategy='ddp_kfac' alone attaches K-FAC: KFAC(params) is bound by the callback the strategy added."""
    import pytorch_lightning as pl

    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0,
                           strategy=kfac_ddp_strategy_class("pytorch_lightning")())
    trainer.fit(_module("pytorch_lightning", lambda m: KFAC(m.parameters(), lr=0.05, factor_update_interval=1)),
                train_dataloaders=_data())
    added = _kfac_callbacks(trainer)
    assert len(added) == 1 and added[0].log_every_n_steps == 0 and not added[0].require_kfac
    assert trainer.optimizers[0].preconditioner.steps == 2
    assert not any(k.startswith("kfac/") for k in trainer.callback_metrics)  # silent


def test_ddp_kfac_uses_the_users_kfac_callback(tmp_path, single_process_group):
    """With the user's KFACCallback (Trainer or configure_callbacks), ddp_kfac adds none: exactly one owner."""
    import pytorch_lightning as pl

    strategy_class = kfac_ddp_strategy_class("pytorch_lightning")
    mine = KFACCallback()
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0, strategy=strategy_class(),
                           callbacks=[mine])
    trainer.fit(_module("pytorch_lightning", lambda m: KFAC(m, lr=0.05)), train_dataloaders=_data())
    assert _kfac_callbacks(trainer) == [mine]

    from_module = KFACCallback()
    module = _module("pytorch_lightning", lambda m: KFAC(m, lr=0.05))
    module.configure_callbacks = lambda: [from_module]
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0, strategy=strategy_class())
    trainer.fit(module, train_dataloaders=_data())
    assert _kfac_callbacks(trainer) == [from_module]


def _fit_fp16(pl, tmp_path, callbacks, fisher="empirical"):
    torch.manual_seed(0)
    module = _module("pytorch_lightning", lambda m: KFAC(m, lr=0.05, factor_update_interval=1, fisher=fisher))
    # an explicit plugin: Lightning would turn precision="16-mixed" into bf16 on the CPU
    plugins = [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0, plugins=plugins, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=_data())
    return trainer


def test_kfac_16_mixed_without_callback_fails_at_the_first_step_naming_it(tmp_path):
    """16-mixed and no KFACCallback: the G factors would carry scale^2; K-FAC refuses at the first step."""
    import pytorch_lightning as pl

    with pytest.raises(RuntimeError, match=r"float16 output gradients.*callbacks=\[lightning_lbo.callbacks."
                                           r"KFACCallback\(\)\].*ddp_kfac"):
        _fit_fp16(pl, tmp_path, [])
    trainer = _fit_fp16(pl, tmp_path, [KFACCallback()])  # the fix the message names
    pre = trainer.optimizers[0].preconditioner
    assert pre.grad_scaler is not None and pre.steps >= 1


def test_kfac_binding_fp16_gradients_need_a_grad_scaler_outside_lightning():
    """Pure torch: fp16 autocast output gradients and no grad_scaler raise at the first step, before any commit;
    with the scaler given, the same step runs."""
    from lightning_lbo.optim.kfac.binding import check_bound

    def step(opt, model):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    with pytest.raises(RuntimeError, match=r"float16 output gradients.*grad_scaler=scaler"):
        step(opt, model)
    assert all(sum(b.refreshes.values()) == 0 for b in opt.preconditioner.blocks)  # nothing committed
    opt.preconditioner.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step(opt, model)
    assert opt.preconditioner.steps == 1
    check_bound(opt.preconditioner)  # checked once: later calls return at once

    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # fp32 gradients need no scaler
    assert opt.preconditioner.steps == 1

    torch.manual_seed(0)  # float16 without loss scaling: a disabled scaler says so, and G is left as it is
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.1, factor_update_interval=1, grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    step(opt, model)
    assert opt.preconditioner.steps == 1


def _bare_preconditioner_on_two_ranks(rank, world_size):
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = nn.Linear(4, 2)
    pre = KFACPreconditioner(model, kl_clip=None, factor_update_interval=1)
    with pytest.raises(RuntimeError, match=r"2 ranks with no communicator.*callbacks=\[lightning_lbo.callbacks."
                                           r"KFACCallback\(\)\].*ddp_kfac.*set_communicator\(default_communicator"):
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
