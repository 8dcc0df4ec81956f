"""K-FAC's lifecycle: one set of hooks, teardown, argument errors, MC capture that sees nothing, AMP scale."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.kfac import KFACCallback
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.models import MLP
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class
from tests.conftest import make_trainer


@pytest.fixture
def single_process_group():
    """ddp_kfac on one CPU device initialises a process group; destroy it so later tests see none."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_kfac_rebuilt_on_the_same_model_leaves_one_set_of_hooks():
    """KFAC(model) built twice (a second configure_optimizers, lr_find, fit): the first stops capturing."""
    model = _net()
    first = KFAC(model, lr=0.1, factor_update_interval=1)
    second = KFAC(model, lr=0.1, factor_update_interval=1)
    assert len(model._forward_hooks) == 1 and all(len(m._forward_hooks) == 1 for m in (model[0], model[2]))
    _step(model, second)
    assert not first.preconditioner.capture.active and first.preconditioner.capture.captured == {}
    assert all(sum(b.refreshes.values()) == 0 for b in first.preconditioner.blocks)
    assert all(sum(b.refreshes.values()) == 2 for b in second.preconditioner.blocks)
    second.preconditioner.remove_hooks()
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_kfac_callback_removes_hooks_at_the_end_of_fit(tmp_path):
    """KFACCallback's teardown removes the capture hooks; a second fit builds exactly one new set."""
    import pytorch_lightning as pl

    module = classifier_module_class("pytorch_lightning")(
        MLP(in_features=4, hidden=(8,), num_classes=2), optimizer=lambda m: KFAC(m, lr=0.05), num_classes=2)
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    hooked = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for _ in range(2):
        trainer = make_trainer(pl, tmp_path, max_steps=2, limit_val_batches=0, callbacks=[KFACCallback()])
        trainer.fit(module, train_dataloaders=data)
        assert all(not m._forward_hooks for m in hooked) and not module._forward_hooks


def test_kfac_typo_in_an_argument_names_kfac_and_the_valid_names():
    """An unknown keyword is a TypeError from KFAC (not KFACPreconditioner.__init__) with a suggestion."""
    with pytest.raises(TypeError, match=r"KFAC got unexpected keyword argument\(s\) 'dampin' \(did you mean "
                                        r"'damping'\?\)\. Valid: .*factor_update_interval.*weight_decay"):
        KFAC(_net(), lr=0.1, dampin=1e-3)


def test_kfac_mc_fisher_that_captures_no_output_gradient_warns_once():
    """fisher='mc' bound to a wrapper whose forward is not called (training_step calls self.net): warned once."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

    wrapper = Wrapper()
    opt = KFAC(wrapper, lr=0.1, fisher="mc", factor_update_interval=1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.warns(RuntimeWarning, match=r"captured no output-gradient statistic for \['net.0', 'net.2'\].*"
                                            r"KFAC\(self.net, \.\.\.\).*run_mc_backward"):
        opt.zero_grad()
        F.cross_entropy(wrapper.net(x), y).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(wrapper.net(x), y).backward()
        opt.step()
        opt.zero_grad()
        F.cross_entropy(wrapper(x), y).backward()  # through the bound module: G is captured, no warning
        opt.step()
    assert opt.preconditioner.blocks[0].refreshes["G"] == 1  # only the forward through the bound module


def _fit_amp(pl, tmp_path, strategy, scaler, kfac_kwargs):
    from lightning_lbo.compat import package_of  # noqa: F401  (both packages share the plugin API)

    torch.manual_seed(0)
    module = classifier_module_class("pytorch_lightning")(
        MLP(in_features=4, hidden=(8,), num_classes=2), num_classes=2,
        optimizer=lambda m: KFAC(m, lr=0.05, factor_update_interval=1, **kfac_kwargs))
    plugins = [] if scaler is None else [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    data = DataLoader(TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)),
                                    torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))),
                      batch_size=16)
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0, strategy=strategy, plugins=plugins)
    trainer.fit(module, train_dataloaders=data)
    return trainer.optimizers[0].preconditioner


def test_ddp_kfac_without_callback_removes_the_amp_loss_scale_from_g(tmp_path, single_process_group):
    """16-mixed under ddp_kfac and no KFACCallback, a real torch.amp.GradScaler: G carries no scale^2."""
    import pytorch_lightning as pl

    strategy_class = kfac_ddp_strategy_class("pytorch_lightning")
    plain = _fit_amp(pl, tmp_path, "auto", None, {})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    amp = _fit_amp(pl, tmp_path, strategy_class(), scaler, {})
    assert amp.grad_scaler is scaler
    for a, b in zip(amp.blocks, plain.blocks, strict=True):
        # fp16 autocast changes the forward slightly; an unremoved scale would multiply G by 2^24
        torch.testing.assert_close(a.factors["G"], b.factors["G"], rtol=0.05, atol=1e-3)


def test_ddp_kfac_without_a_kfac_optimizer_warns(tmp_path, single_process_group):
    """strategy='ddp_kfac' training a plain SGD module warns once, naming the fix."""
    import pytorch_lightning as pl

    module = classifier_module_class("pytorch_lightning")(MLP(in_features=4, hidden=(8,), num_classes=2),
                                                          optimizer=sgd_factory(lr=0.1), num_classes=2)
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
    trainer = make_trainer(pl, tmp_path, max_steps=1, limit_val_batches=0,
                           strategy=kfac_ddp_strategy_class("pytorch_lightning")())
    with pytest.warns(UserWarning, match=r"ddp_kfac' found no K-FAC optimizer.*lightning_lbo.KFAC\(self"):
        trainer.fit(module, train_dataloaders=data)


def test_kfac_preconditioner_reports_missing_layer_clearly():
    """Accessors name the preconditioned layers when asked for another one."""
    model = _net()
    pre = KFACPreconditioner(model)
    with pytest.raises(KeyError, match=r"preconditioned layers: \['0', '2'\]"):
        pre.factors(model[1])


def test_kfac_core_imports_no_lightning_and_no_distributed_implementation():
    """`optim/kfac` is pure torch: no Lightning package and no torch.distributed communicator at import."""
    import subprocess
    import sys

    code = ("import sys, lightning_lbo.optim.kfac, lightning_lbo.optim.kfac.capture;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')"
            " or m == 'lightning_lbo.optim.kfac.distributed'];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
