"""LARS, LAMB, RMSpropWarmup in Lightning: configure_optimizers (both packages), FractionalEpoch, LightningCLI."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.fractional_epoch import FractionalEpoch, fractional_epoch
from lightning_lbo.classifier import classifier_module_class
from lightning_lbo.compat import package_of
from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup
from tests.conftest import make_trainer


def _loader(n=48, batch_size=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _module(pl, optimizer):
    cls = classifier_module_class(pl.__name__)
    return cls("mlp", optimizer=optimizer, model_kwargs=dict(hidden=(16,), in_features=64))


OPTIMIZERS = {
    "lars": lambda m: LARS(m.parameters(), lr=1.0, weight_decay=1e-4, trust_coefficient=0.01),
    "lamb": lambda m: LAMB(m.parameters(), lr=1e-2, weight_decay=1e-2),
    "rmsprop_warmup": lambda m: RMSpropWarmup(m.parameters(), lr=0.05, beta_center=0.5, beta_period=1.0),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_train_from_configure_optimizers(pl_package, tmp_path, name):
    """Each optimizer trains a module from configure_optimizers with either Lightning package."""
    module = _module(pl_package, OPTIMIZERS[name])
    before = [p.detach().clone() for p in module.parameters()]
    callbacks = [FractionalEpoch()] if name == "rmsprop_warmup" else []
    trainer = make_trainer(pl_package, tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=_loader())
    assert package_of(trainer) == pl_package.__name__
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == {"lars": "LARS", "lamb": "LAMB", "rmsprop_warmup": "RMSpropWarmup"}[name]
    assert trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert opt.nonfinite_skips.item() == 0
    if name == "rmsprop_warmup":
        assert callbacks[0].last_epoch == pytest.approx(1 + 5 / 6)


def test_fractional_epoch_under_gradient_accumulation(pl_package, tmp_path):
    """With accumulation the callback's epoch at optimizer step n is n / ceil(batches / k), like steps_per_epoch."""
    module = _module(pl_package, lambda m: RMSpropWarmup(m.parameters(), lr=0.05))
    seen = []
    trainer = make_trainer(pl_package, tmp_path, max_epochs=2, accumulate_grad_batches=2, limit_train_batches=5,
                           callbacks=[FractionalEpoch()])
    module.on_train_start = lambda: trainer.optimizers[0].register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.current_epoch()))
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 6  # 3 steps per epoch: windows {0,1}, {2,3}, {4}
    assert seen == pytest.approx([n / 3 for n in range(6)])
    assert fractional_epoch(1, 4, 5, 2) == pytest.approx(1 + 2 / 3)


def test_fractional_epoch_rejects_two_epoch_sources(tmp_path):
    """steps_per_epoch plus the callback is ambiguous: fit fails before training with the fix."""
    pl = importlib.import_module("pytorch_lightning")
    module = _module(pl, lambda m: RMSpropWarmup(m.parameters(), steps_per_epoch=6))
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[FractionalEpoch()])
    with pytest.raises(ValueError, match="two sources for the epoch"):
        trainer.fit(module, train_dataloaders=_loader())


def test_rmsprop_warmup_resume_matches_uninterrupted_run(tmp_path):
    """Checkpoint after epoch 1 and resume: same weights as 2 uninterrupted epochs (callback + optimizer state)."""
    pl = importlib.import_module("pytorch_lightning")

    def fit(max_epochs, ckpt_path=None, seed_module=None):
        torch.manual_seed(0)
        module = seed_module or _module(pl, lambda m: RMSpropWarmup(m.parameters(), lr=0.05, beta_center=1.0,
                                                                    beta_period=1.0))
        trainer = make_trainer(pl, tmp_path, max_epochs=max_epochs, callbacks=[FractionalEpoch()])
        trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = fit(2)
    half, trainer = fit(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, trainer = fit(2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert trainer.optimizers[0].steps_taken == 12
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cli_model_class(pl):
    class TinyRegression(pl.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(32, 4, generator=gen)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    return TinyRegression


@pytest.mark.parametrize("optimizer", [
    ["--optimizer", "lightning_lbo.LARS", "--optimizer.lr", "0.5", "--optimizer.momentum_form", "paper"],
    ["--optimizer", "lightning_lbo.LAMB", "--optimizer.lr", "0.01"],
    ["--optimizer", "lightning_lbo.RMSpropWarmup", "--optimizer.steps_per_epoch", "4"],
])
def test_optimizers_from_lightning_cli(pl_package, tmp_path, monkeypatch, optimizer):
    """LightningCLI builds each optimizer from its class path alone and trains with it."""
    monkeypatch.setattr("sys.argv", ["lightning-cli"])  # only args=[...] reaches the parser
    cli_module = importlib.import_module(f"{pl_package.__name__}.cli")
    args = ["fit", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}", *optimizer]
    cli = cli_module.LightningCLI(_cli_model_class(pl_package), args=args, save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == optimizer[1].split(".")[-1]
    assert cli.trainer.global_step == 4
    if optimizer[1].endswith("LARS"):
        assert opt.param_groups[0]["momentum_form"] == "paper" and opt.param_groups[0]["lr"] == 0.5


def test_nonfinite_batch_guard_logs_and_warns_once(pl_package, tmp_path):
    """NaN gradients on some steps: weights stay finite, the count of skipped steps is logged, one warning."""
    from lightning_lbo.callbacks.nonfinite_batches import NonFiniteBatchGuard

    module = _module(pl_package, OPTIMIZERS["lars"])
    poisoned = module.model.net[-1].bias

    def poison(grad):
        return grad.clone().fill_(float("nan")) if module.global_step in (1, 3) else grad

    poisoned.register_hook(poison)
    monitor = NonFiniteBatchGuard(log_every_n_steps=2)
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[monitor], log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"1 optimizer step\(s\) were skipped") as record:
        trainer.fit(module, train_dataloaders=_loader())
    assert sum("were skipped" in str(w.message) for w in record) == 1
    assert monitor.total == 2 and trainer.callback_metrics["nonfinite_skips"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_fractional_epoch_continues_after_mid_epoch_resume(tmp_path):
    """Resuming from a checkpoint saved mid-epoch, the optimizer steps see the epochs an uninterrupted run sees."""
    pl = importlib.import_module("pytorch_lightning")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                        filename="{step}")

    def fit(ckpt_path=None, callbacks=()):
        module = _module(pl, lambda m: RMSpropWarmup(m.parameters(), lr=0.05))
        seen = []
        trainer = make_trainer(pl, tmp_path, max_epochs=2, callbacks=[FractionalEpoch(), *callbacks],
                               enable_checkpointing=bool(callbacks))
        module.on_train_start = lambda: trainer.optimizers[0].register_step_pre_hook(
            lambda opt, args, kwargs: seen.append(opt.current_epoch()))
        trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
        return seen

    assert fit(callbacks=[ckpt]) == pytest.approx([n / 6 for n in range(12)])
    resumed = fit(ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert resumed == pytest.approx([n / 6 for n in range(2, 12)])
