"""The adaptive-batch configuration a user reaches first is a safe one (issue 26, item 13).

A constant LR with neither ``LRSchedule`` nor a torch scheduler used to have every LR multiplied by
each growth at once (measured: -1.2 points of test accuracy against fixed batch 128 on 3 seeds); it is
refused at fit start with the recommended pairing in the message, and ``scale_lr="linear"`` keeps the
old behaviour as an explicit choice.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lbo.batch_rules import RampRule
from lightning_lbo.callbacks import GradientNoiseScale, LRSchedule
from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from tests.conftest import make_trainer
from tests.test_adaptive_batch_size import StepSpy, tiny_classifier, tiny_loader


def test_adaptive_batch_size_constant_lr_without_lr_schedule_refused_at_fit_start(pl_package, tmp_path):
    """The first setup (noise rule + GradientNoiseScale, momentum SGD at a constant LR): an error naming LRSchedule."""
    cb = AdaptiveBatchSize(rule="noise_scale")
    trainer = make_trainer(pl_package, tmp_path, max_epochs=2,
                           callbacks=[GradientNoiseScale(beta=0.9, probe_every_n_steps=2), cb])
    with pytest.raises(ValueError, match=r"no LRSchedule and no LR scheduler.*LRSchedule\(reference_batch_size=.*"
                                         r"scaling=\"sqrt\"\).*rewarmup_steps=50.*scale_lr=False.*scale_lr='linear'"):
        trainer.fit(tiny_classifier(pl_package), tiny_loader())
    assert trainer.global_step == 0  # refused before any step


def test_adaptive_batch_size_noise_rule_error_names_the_lr_pairing(pl_package, tmp_path):
    """The error a newcomer meets first (no GradientNoiseScale) also names the LRSchedule pairing, unless present."""
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[AdaptiveBatchSize(rule="noise_scale")])
    with pytest.raises(ValueError, match=r"GradientNoiseScale\(beta=0\.9.*also add LRSchedule\(.*rewarmup_steps=50"):
        trainer.fit(tiny_classifier(pl_package), tiny_loader())
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1,
                           callbacks=[LRSchedule(reference_batch_size=4, log=False),
                                      AdaptiveBatchSize(rule="noise_scale")])
    with pytest.raises(ValueError, match=r"probe_every_n_steps=20\) to the Trainer's callbacks\.$"):
        trainer.fit(tiny_classifier(pl_package), tiny_loader())


@pytest.mark.parametrize("scale_lr, lrs", [("linear", [0.1, 0.2]), (False, [0.1, 0.1])])
def test_adaptive_batch_size_explicit_scale_lr_at_constant_lr(pl_package, tmp_path, scale_lr, lrs):
    """``scale_lr="linear"`` doubles the LR with the batch (the old default, now explicit); ``False`` keeps it."""
    spy = StepSpy.make(pl_package)
    cb = AdaptiveBatchSize(rule=RampRule({0: 1, 1: 2}), scale_lr=scale_lr)
    trainer = make_trainer(pl_package, tmp_path, max_epochs=2, callbacks=[cb, spy])
    trainer.fit(tiny_classifier(pl_package), tiny_loader())
    per_epoch = [sorted({lr for lr, e in zip(spy.lrs, spy.epochs, strict=True) if e == epoch}) for epoch in (0, 1)]
    assert per_epoch == [[pytest.approx(lrs[0])], [pytest.approx(lrs[1])]]
    assert cb.factor == 2


def test_adaptive_batch_size_torch_scheduler_keeps_the_linear_rule(pl_package, tmp_path):
    """With a torch scheduler in configure_optimizers (the absa recipe's path) nothing is refused: LR x2 at growth."""
    module = tiny_classifier(pl_package)

    def configure_optimizers():
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)}

    module.configure_optimizers = configure_optimizers
    spy = StepSpy.make(pl_package)
    trainer = make_trainer(pl_package, tmp_path, max_epochs=2,
                           callbacks=[AdaptiveBatchSize(rule=RampRule({0: 1, 1: 2})), spy])
    trainer.fit(module, tiny_loader())
    assert spy.lrs[0] == pytest.approx(0.1) and spy.lrs[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("bad", ["sqrt", 1, None])
def test_adaptive_batch_size_rejects_invalid_scale_lr(bad):
    with pytest.raises(ValueError, match="Invalid scale_lr"):
        AdaptiveBatchSize(scale_lr=bad)
