"""AdaptiveBatchSize with the resize mechanism in a Trainer: coverage, LR, exact resume, 2 ranks == 1 process."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.batch_rules import NoiseScaleRule, RampRule
from lightning_lbo.batch_sampler import ResizableBatchSampler, ResizableDataLoader
from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_lbo.callbacks.lr_schedule import LRSchedule
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package
from tests.conftest import make_trainer

N = 64


def dataset() -> TensorDataset:
    """Column 0 of x is the sample's index, so a spy can tell which samples a batch held."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(N, dtype=torch.float32)[:, None] / N, torch.randn(N, 3, generator=gen)], dim=1)
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=gen))


def resizable_loader(batch_size: int, **kwargs) -> ResizableDataLoader:
    return ResizableDataLoader(dataset(), ResizableBatchSampler(N, batch_size, seed=5, **kwargs))


def module(pl, momentum: float = 0.9):
    torch.manual_seed(0)
    return classifier_module_class(pl.__name__)(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
                                                num_classes=3,
                                                optimizer=sgd_factory(lr=0.1, momentum=momentum, weight_decay=0.0))


def spy_class(pl):
    class Spy(pl.Callback):
        """Per optimizer step: epoch, per-device batch, LR, sample indices."""

        def __init__(self):
            self.rows, self.val_epochs = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._idx = (batch[0][:, 0] * N).round().long().tolist()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rows.append((trainer.current_epoch, len(self._idx), optimizer.param_groups[0]["lr"], self._idx))

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.val_epochs.append(trainer.current_epoch)

    return Spy


def fit(pl, tmp_path, ramp, epochs, callbacks=(), loader=None, ckpt=None, **kwargs):
    spy = spy_class(pl)()
    abs_cb = AdaptiveBatchSize(rule=kwargs.pop("rule", None) or RampRule(ramp), mechanism="resize",
                               max_factor=kwargs.pop("max_factor", 8), rewarmup_steps=kwargs.pop("rewarmup_steps", 0),
                               decide_every_n_steps=kwargs.pop("decide_every_n_steps", None),
                               measure_fn=kwargs.pop("measure_fn", None))
    schedule = kwargs.pop("schedule", None) or LRSchedule(reference_batch_size=4, log=False)
    trainer = make_trainer(pl, tmp_path, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                           callbacks=[schedule, abs_cb, spy, *callbacks], num_sanity_val_steps=0, **kwargs)
    m = module(pl)
    trainer.fit(m, train_dataloaders=loader or resizable_loader(4), ckpt_path=ckpt,
                val_dataloaders=DataLoader(dataset(), batch_size=32))
    return trainer, m, spy, abs_cb


def test_resize_grows_the_real_batch_covers_every_epoch_and_the_lr_follows(pl_package, tmp_path):
    """Ramp 4 -> 8 -> 16 per device: every epoch sees each sample once, LR x2 per doubling, validation each epoch."""
    trainer, _, spy, abs_cb = fit(pl_package, tmp_path, {0: 1, 1: 2, 2: 4}, 3)
    for epoch, size in enumerate((4, 8, 16)):
        rows = [r for r in spy.rows if r[0] == epoch]
        assert {r[1] for r in rows} == {size} and len(rows) == N // size
        assert sorted(i for r in rows for i in r[3]) == list(range(N))
        assert {round(r[2], 9) for r in rows} == {0.1 * size / 4}
    assert spy.val_epochs == [0, 1, 2] and trainer.global_step == 16 + 8 + 4
    assert [h["global_batch"] for h in abs_cb.history] == [4, 8, 16]


def test_resize_rewarmup_and_epoch_milestones_follow_the_examples(tmp_path):
    """After a doubling the LR ramps over rewarmup_steps; an epoch milestone stays at its epoch (clock in examples)."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    schedule = LRSchedule(reference_batch_size=4, decay="step", milestones=[2], gamma=0.1, log=False)
    _, _, spy, _ = fit(pl, tmp_path, {0: 1, 1: 2}, 3, rewarmup_steps=2, schedule=schedule)
    lrs = [round(r[2], 9) for r in spy.rows]
    # epoch 0: 16 steps at 0.1; epoch 1: ramp 0.1 -> 0.2 over 2 steps, then 0.2; epoch 2 (the milestone): 0.02
    assert lrs == [0.1] * 16 + [0.1, 0.15] + [0.2] * 6 + [0.02] * 8


def test_resize_resume_mid_epoch_after_a_resize_continues_exactly(tmp_path):
    """A checkpoint 3 steps into the first resized epoch, resumed: same batches, LR and weights as one run."""
    pl = lightning_package(PYTORCH_LIGHTNING)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 16 + 3:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    ramp = {0: 1, 1: 2, 2: 4}
    full_trainer, full, full_spy, full_cb = fit(pl, tmp_path, ramp, 3, rewarmup_steps=4)
    fit(pl, tmp_path, ramp, 3, callbacks=[SaveAt()], rewarmup_steps=4)
    trainer, resumed, spy, cb = fit(pl, tmp_path, ramp, 3, ckpt=str(tmp_path / "mid.ckpt"), rewarmup_steps=4)
    assert spy.rows == full_spy.rows[-len(spy.rows):] and len(spy.rows) == 5 + 4
    assert trainer.global_step == full_trainer.global_step and cb.history == full_cb.history
    for p, q in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _grow_every_3_steps(pl, tmp_path, **kwargs):
    """A noise-scale rule that always wants more, deciding every 3 steps: 4 -> 8 -> 16 per device within epoch 0."""
    return fit(pl, tmp_path, None, 2, rule=NoiseScaleRule(margin=1.0), measure_fn=lambda trainer, module: 1e9,
               decide_every_n_steps=3, max_factor=4, rewarmup_steps=2, **kwargs)


def test_resize_step_interval_decisions_grow_mid_epoch_and_cover_every_epoch(tmp_path):
    """decide_every_n_steps: the batch grows inside an epoch, every epoch still sees each sample exactly once."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    trainer, _, spy, cb = _grow_every_3_steps(pl, tmp_path)
    for epoch in (0, 1):
        rows = [r for r in spy.rows if r[0] == epoch]
        assert sorted(i for r in rows for i in r[3]) == list(range(N))
    # epoch 0: 3 steps of 4 decide x2, 3 steps of 8 decide x2, then 16 and the short rest (64 - 12 - 24 - 16 = 12)
    assert [r[1] for r in spy.rows if r[0] == 0] == [4, 4, 4, 8, 8, 8, 16, 12]
    assert [r[1] for r in spy.rows if r[0] == 1] == [16] * 4
    assert [(h["step"], h["next_factor"]) for h in cb.history] == [(3, 2), (6, 4), (9, 4), (12, 4)]
    # the LR follows the global batch through LRSchedule's 2-step re-warmup (linear rule, reference batch 4)
    assert [round(r[2], 9) for r in spy.rows] == [0.1] * 4 + [0.15, 0.2, 0.2, 0.3] + [0.4] * 4


def test_resize_step_interval_resume_mid_epoch_continues_exactly(tmp_path):
    """A checkpoint between two mid-epoch resizes, resumed: same batches, LR, decisions and weights as one run."""
    pl = lightning_package(PYTORCH_LIGHTNING)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    full_trainer, full, full_spy, full_cb = _grow_every_3_steps(pl, tmp_path)
    _grow_every_3_steps(pl, tmp_path, callbacks=[SaveAt()])
    trainer, resumed, spy, cb = _grow_every_3_steps(pl, tmp_path, ckpt=str(tmp_path / "mid.ckpt"))
    assert spy.rows == full_spy.rows[5:]
    assert trainer.global_step == full_trainer.global_step and cb.history == full_cb.history
    for p, q in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_step_interval_decisions_reject_fixed_accumulation_and_ramps(tmp_path):
    """decide_every_n_steps: not with a Trainer's fixed accumulation, not with an epoch ramp, not with 0."""
    with pytest.raises(ValueError, match="RampRule is a schedule by epoch"):
        AdaptiveBatchSize(rule=RampRule({0: 1}), mechanism="resize", decide_every_n_steps=10)
    with pytest.raises(ValueError, match="Invalid decide_every_n_steps"):
        AdaptiveBatchSize(rule="noise_scale", mechanism="resize", decide_every_n_steps=0)
    pl = lightning_package(PYTORCH_LIGHTNING)
    with pytest.raises(ValueError, match="remove accumulate_grad_batches"):
        _grow_every_3_steps(pl, tmp_path, accumulate_grad_batches=2)


def test_resize_rejects_missing_trainer_settings(tmp_path):
    """No reload per epoch, or a loader without a ResizableBatchSampler: errors that say what to set."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    cb = AdaptiveBatchSize(rule=RampRule({0: 1}), mechanism="resize", scale_lr=False)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(module(pl), resizable_loader(4))
    trainer = make_trainer(pl, tmp_path, max_epochs=1, reload_dataloaders_every_n_epochs=1,
                           callbacks=[AdaptiveBatchSize(rule=RampRule({0: 1}), mechanism="resize", scale_lr=False)])
    with pytest.raises(TypeError, match="ResizableDataLoader"):
        trainer.fit(module(pl), DataLoader(dataset(), batch_size=4))


class EqualsReference(lightning_package(PYTORCH_LIGHTNING).Callback):
    """Asserts inside each ddp_spawn worker: both ranks' samples make the 1-process batch, weights equal its."""

    def __init__(self, expected, expected_rows):
        self.expected, self.expected_rows, self.indices = expected, expected_rows, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append((batch[0][:, 0] * N).round().long())

    def on_fit_end(self, trainer, pl_module):
        assert trainer.world_size == 2 and len(self.indices) == len(self.expected_rows)
        for step, local in enumerate(self.indices):
            both = [torch.zeros_like(local) for _ in range(2)]
            torch.distributed.all_gather(both, local)
            assert torch.cat(both).tolist() == self.expected_rows[step], step
        for p, q in zip(pl_module.parameters(), self.expected, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_resize_two_ranks_equal_one_process(tmp_path):
    """ddp_spawn, 2 ranks at 4 -> 8 per device == 1 process at 8 -> 16: same samples per step, same weights."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    ramp = {0: 1, 1: 2}
    _, ref, ref_spy, _ = fit(pl, tmp_path, ramp, 2, loader=resizable_loader(8),
                             schedule=LRSchedule(reference_batch_size=8, log=False))
    expected = [p.detach().clone() for p in ref.parameters()]
    check = EqualsReference(expected, [r[3] for r in ref_spy.rows])
    trainer = make_trainer(pl, tmp_path, max_epochs=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                           reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_val_batches=0,
                           callbacks=[LRSchedule(reference_batch_size=8, log=False),
                                      AdaptiveBatchSize(rule=RampRule(ramp), mechanism="resize"), check])
    trainer.fit(module(pl), resizable_loader(4))


def test_resize_growth_corrects_momentum_through_lr_schedule(tmp_path):
    """momentum_correction: at each LR change of the re-warmup ramp the buffers are scaled by lr_new / lr_old."""
    pl = lightning_package(PYTORCH_LIGHTNING)

    class BufferSpy(pl.Callback):
        def __init__(self):
            self.ratios, self.saved = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after LRSchedule's hook
            opt = trainer.optimizers[0]
            buf = opt.state[next(iter(pl_module.parameters()))].get("momentum_buffer")
            if buf is not None and self.saved is not None:
                lr = opt.param_groups[0]["lr"]
                self.ratios.append((round(lr / self.saved[1], 9), round((buf / self.saved[0]).mean().item(), 5)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            buf = opt.state[next(iter(pl_module.parameters()))]["momentum_buffer"]
            self.saved = (buf.clone(), opt.param_groups[0]["lr"])

    spy = BufferSpy()
    schedule = LRSchedule(reference_batch_size=4, momentum_correction=True, log=False)
    fit(pl, tmp_path, {0: 1, 1: 2}, 2, callbacks=[spy], rewarmup_steps=2, schedule=schedule)
    assert [r for r in spy.ratios if r[0] != 1.0] == [(1.5, 1.5), (round(0.2 / 0.15, 9), round(0.2 / 0.15, 5))]
    assert all(b == 1.0 for lr, b in spy.ratios if lr == 1.0)
