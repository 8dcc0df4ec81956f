"""AdaptiveBatchSize: the doubling rule, real accumulation changes, LR scaling, resume, configuration errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import package_of
from tests.conftest import make_trainer

BATCHES_PER_EPOCH = 8


def tiny_classifier(pl):
    torch.manual_seed(0)
    return classifier_module_class(pl.__name__)(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
                                                num_classes=3, optimizer=sgd_factory(lr=0.1, momentum=0.0,
                                                                                     weight_decay=0.0))


def tiny_loader(batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = BATCHES_PER_EPOCH * batch_size
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)),
                      batch_size=batch_size, shuffle=False)


def scripted(values):
    """An eigenvalue source that returns values[epoch]."""
    return lambda trainer, module: values[trainer.current_epoch]


class StepSpy:
    """Counts micro-batches per optimizer step and records the LR at each step (built per package)."""

    @staticmethod
    def make(pl):
        class Spy(pl.Callback):
            def __init__(self):
                self.micro, self.per_step, self.lrs, self.epochs = 0, [], [], []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.micro += 1

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.per_step.append(self.micro)
                self.lrs.append(optimizer.param_groups[0]["lr"])
                self.epochs.append(trainer.current_epoch)
                self.micro = 0

        return Spy()


def test_adaptive_batch_size_rejects_bad_arguments():
    """Invalid numbers, mechanisms and rule arguments fail at construction, naming the fix."""
    with pytest.raises(ValueError, match="Invalid eigenvalue_ratio"):
        AdaptiveBatchSize(eigenvalue_ratio=1.0)
    with pytest.raises(ValueError, match="Invalid max_factor"):
        AdaptiveBatchSize(max_accumulation=0)
    with pytest.raises(ValueError, match="Invalid mechanism: 'grow'. Supported"):
        AdaptiveBatchSize(mechanism="grow")
    with pytest.raises(ValueError, match="Invalid rule"):
        AdaptiveBatchSize(rule="flat")
    with pytest.raises(ValueError, match="HessianRule"):
        AdaptiveBatchSize(rule="noise_scale", duration=3)


def test_adaptive_batch_size_doubles_micro_batches_and_lr(pl_package, tmp_path):
    """Scripted eigenvalues: 2 micro-batches per step after the first halving, 4 after the second, LR x2 each."""
    spy = StepSpy.make(pl_package)
    cb = AdaptiveBatchSize(max_accumulation=4, duration=10, eigenvalue_fn=scripted([10, 9, 4, 3.5, 1.9, 0.5]),
                           scale_lr="linear")
    trainer = make_trainer(pl_package, tmp_path, max_epochs=6, callbacks=[cb, spy])
    trainer.fit(tiny_classifier(pl_package), tiny_loader())
    per_epoch = {e: sorted({m for m, ep in zip(spy.per_step, spy.epochs, strict=True) if ep == e}) for e in range(6)}
    assert per_epoch == {0: [1], 1: [1], 2: [1], 3: [2], 4: [2], 5: [4]}
    steps = [spy.epochs.count(e) for e in range(6)]
    assert steps == [8, 8, 8, 4, 4, 2] and trainer.global_step == 34
    lr_by_epoch = [{round(lr, 9) for lr, ep in zip(spy.lrs, spy.epochs, strict=True) if ep == e} for e in range(6)]
    assert lr_by_epoch == [{0.1}, {0.1}, {0.1}, {0.2}, {0.2}, {0.4}]
    assert [h["factor"] for h in cb.history] == [1, 1, 1, 2, 2, 4]  # trained with
    assert [h["next_factor"] for h in cb.history] == [1, 1, 2, 2, 4, 4]  # decided at the epoch's end
    assert trainer.callback_metrics["abs/factor"].item() == 4


def test_adaptive_batch_size_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Stop after 4 epochs, resume to 6: same accumulation, LR, steps and history as one 6-epoch run."""
    import pytorch_lightning as pl

    values = [10, 9, 4, 3.5, 1.9, 0.5]

    def run(max_epochs, ckpt=None, root=tmp_path / "a"):
        spy = StepSpy.make(pl)
        cb = AdaptiveBatchSize(max_accumulation=4, eigenvalue_fn=scripted(values), scale_lr="linear")
        saver = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        trainer = make_trainer(pl, root, max_epochs=max_epochs, callbacks=[cb, spy, saver], enable_checkpointing=True)
        trainer.fit(tiny_classifier(pl), tiny_loader(), ckpt_path=ckpt)
        return trainer, cb, spy

    full_trainer, full_cb, full_spy = run(6, root=tmp_path / "full")
    run(4)
    trainer, cb, spy = run(6, ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert cb.history == full_cb.history and cb.accumulation == full_cb.accumulation == 4
    assert cb.rule.reference == full_cb.rule.reference and cb.fixed.batches[0][0].equal(full_cb.fixed.batches[0][0])
    assert trainer.global_step == full_trainer.global_step
    assert spy.per_step == full_spy.per_step[-len(spy.per_step):] and spy.lrs == full_spy.lrs[-len(spy.lrs):]
    for p, q in zip(trainer.lightning_module.parameters(), full_trainer.lightning_module.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_adaptive_batch_size_measures_the_hessian_eigenvalue(tmp_path):
    """Without a script the logged eigenvalue is the top Hessian eigenvalue of the fixed first batch."""
    import pytorch_lightning as pl

    from lightning_lbo.hessian import HessianOperator

    cb = AdaptiveBatchSize(power_iters=200, tol=1e-6, scale_lr="linear")
    module = tiny_classifier(pl)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[cb])
    trainer.fit(module, tiny_loader())
    dense = HessianOperator(module, cb.fixed.batches).dense().double()
    evals = torch.linalg.eigvalsh((dense + dense.T) / 2)
    assert cb.history[0]["measurement"] == pytest.approx(evals.abs().max().item(), rel=1e-2)
    x0 = tiny_loader().dataset.tensors[0][:4]
    assert cb.fixed.batches[0][0].equal(x0)


def test_adaptive_batch_size_rejects_conflicting_settings(pl_package, tmp_path):
    """Trainer accumulation, GradientAccumulationScheduler and manual optimization fail with what to change."""
    cb = AdaptiveBatchSize(eigenvalue_fn=scripted([1.0]))
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[cb])
    with pytest.raises(ValueError, match="remove it"):
        trainer.fit(tiny_classifier(pl_package), tiny_loader())
    gas = pl_package.callbacks.GradientAccumulationScheduler({0: 1, 1: 2})
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[AdaptiveBatchSize(), gas])
    with pytest.raises(ValueError, match="remove one of them"):
        trainer.fit(tiny_classifier(pl_package), tiny_loader())
    module = tiny_classifier(pl_package)
    module.automatic_optimization = False
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[AdaptiveBatchSize()])
    with pytest.raises(RuntimeError, match="manual"):
        trainer.fit(module, tiny_loader())
    assert package_of(trainer) == pl_package.__name__


def test_noise_scale_rule_grows_on_the_measured_b_simple(tmp_path):
    """The rule sees GradientNoiseScale's probe estimate each epoch and doubles exactly when B_simple >= the batch."""
    import pytorch_lightning as pl

    from lightning_lbo.batch_rules import NoiseScaleRule
    from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale

    gns = GradientNoiseScale(beta=0.5, probe_every_n_steps=2, log_every_n_steps=2)
    cb = AdaptiveBatchSize(rule=NoiseScaleRule(margin=1.0), max_factor=8, scale_lr="linear")
    trainer = make_trainer(pl, tmp_path, max_epochs=3, callbacks=[gns, cb])
    trainer.fit(tiny_classifier(pl), tiny_loader())
    # factor 1: a probe every 2nd step; factor >= 2: every step has two batch sizes (micro-batch vs accumulated)
    step, expected = 0, 0
    for row in cb.history:
        for _ in range(BATCHES_PER_EPOCH // row["factor"]):
            expected += row["factor"] > 1 or step % 2 == 0
            step += 1
    assert gns.estimator.updates == expected and trainer.global_step == step
    for row in cb.history:
        grows = row["measurement"] >= row["global_batch"]
        assert row["next_factor"] == row["factor"] * (2 if grows else 1), row
    assert cb.history[-1]["measurement"] == pytest.approx(gns.b_simple(), rel=1e-5)  # one process: the same terms
    assert [h[0] for h in gns.history][:2] == [0, 2]  # probed and logged every 2 steps


def test_noise_scale_rule_needs_gradient_noise_scale(tmp_path):
    """Without the sensor callback, setup says which callback to add."""
    import pytorch_lightning as pl

    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[AdaptiveBatchSize(rule="noise_scale")])
    with pytest.raises(ValueError, match=r"add GradientNoiseScale\("):
        trainer.fit(tiny_classifier(pl), tiny_loader())
