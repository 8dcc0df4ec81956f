"""AdaptiveBatchSize deciding between optimizer steps with gradient accumulation (every N samples or steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_lbo.batch_rules import HessianRule, NoiseScaleRule, RampRule
from lightning_lbo.batch_sampler import ResizableBatchSampler, ResizableDataLoader
from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_lbo.callbacks.lr_schedule import LRSchedule
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package
from tests.conftest import make_trainer

N, BATCH, LR, MOMENTUM = 64, 4, 0.1, 0.9


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def spy_class(pl):
    class Spy(pl.Callback):
        """Per optimizer step: epoch, micro-batches in its window, LR."""

        def __init__(self):
            self.rows, self.micro = [], 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.micro += 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rows.append((trainer.current_epoch, self.micro, optimizer.param_groups[0]["lr"]))
            self.micro = 0

    return Spy


def fit(pl, tmp_path, epochs=2, callbacks=(), ckpt=None, rule=None, measure=1e9, **abs_kwargs):
    """Base batch 4 by accumulation (16 micro-batches an epoch, in order), LR 0.1 per 4 (LRSchedule, linear)."""
    spy = spy_class(pl)()
    abs_cb = AdaptiveBatchSize(rule=rule or NoiseScaleRule(margin=1.0), mechanism="accumulate",
                               max_factor=abs_kwargs.pop("max_factor", 4),
                               measure_fn=measure if callable(measure) else lambda trainer, module: measure,
                               **abs_kwargs)
    trainer = make_trainer(pl, tmp_path, max_epochs=epochs, num_sanity_val_steps=0, limit_val_batches=0,
                           callbacks=[LRSchedule(reference_batch_size=BATCH, log=False), abs_cb, spy, *callbacks])
    module = classifier_module_class(pl.__name__)(net(), num_classes=3,
                                                  optimizer=sgd_factory(lr=LR, momentum=MOMENTUM, weight_decay=0.0))
    loader = ResizableDataLoader(dataset(), ResizableBatchSampler(N, BATCH, shuffle=False))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
    return trainer, module, spy, abs_cb


# Deciding every 12 samples (3 micro-batches of 4) with a rule that always wants more, up to x4:
# step 3 decides x2, but 3 batches into the epoch is not a multiple of 2, so x2 applies after batch 4;
# at batch 6 (12 samples later) it decides x4, which applies after batch 8; then windows of 4.
EXPECTED_WINDOWS = [1, 1, 1, 1, 2, 2, 4, 4] + [4, 4, 4, 4]


def reference_weights(windows):
    """Plain torch: each step the mean loss over its window's micro-batches, LR 0.1 x window (linear rule)."""
    model, data = net(), dataset()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    cursor = 0
    for window in windows:
        x, y = data.tensors[0][cursor: cursor + window * BATCH], data.tensors[1][cursor: cursor + window * BATCH]
        cursor = (cursor + window * BATCH) % N
        opt.zero_grad()
        for i in range(window):  # mean over micro-batch means = mean over the window's samples
            (nn.functional.cross_entropy(model(x[i * BATCH:(i + 1) * BATCH]), y[i * BATCH:(i + 1) * BATCH])
             / window).backward()
        opt.param_groups[0]["lr"] = LR * window
        opt.step()
    return list(model.parameters())


def test_accumulation_sample_interval_growth_waits_for_an_aligned_window(pl_package, tmp_path):
    """Every epoch covers all micro-batches once; windows, LR and weights equal a plain torch loop."""
    trainer, module, spy, cb = fit(pl_package, tmp_path, decide_every_n_samples=12)
    assert [r[1] for r in spy.rows] == EXPECTED_WINDOWS
    assert [sum(r[1] for r in spy.rows if r[0] == e) for e in (0, 1)] == [N // BATCH] * 2
    assert [round(r[2], 9) for r in spy.rows] == [round(LR * w, 9) for w in EXPECTED_WINDOWS]
    # decided at steps 3 and 5 (each 12 samples after the last), then at every step once at x4 (16 samples)
    assert [(h["step"], h["factor"], h["next_factor"]) for h in cb.history] == \
        [(3, 1, 2), (5, 2, 4)] + [(s, 4, 4) for s in range(7, 13)]
    assert trainer.accumulate_grad_batches == 4 and cb.pending_factor is None
    for p, q in zip(module.parameters(), reference_weights(EXPECTED_WINDOWS), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_step_interval_decisions(tmp_path):
    """decide_every_n_steps with accumulation: decisions at optimizer steps 2, 4, ..., growth when aligned."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    _, _, spy, cb = fit(pl, tmp_path, epochs=1, decide_every_n_steps=2)
    # step 2 (after 2 batches) decides x2, aligned: at once; step 4 (after 6 batches) decides x4, which waits for
    # batch 8; then windows of 4
    assert [r[1] for r in spy.rows] == [1, 1, 2, 2, 2, 4, 4]
    assert [(h["step"], h["next_factor"]) for h in cb.history] == [(2, 2), (4, 4), (6, 4)]


def test_accumulation_interval_resume_with_a_pending_growth_continues_exactly(tmp_path):
    """A checkpoint at step 3 (x2 decided, not yet applied), resumed: same windows, LR, decisions, weights."""
    pl = lightning_package(PYTORCH_LIGHTNING)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and not (tmp_path / "mid.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    _, full, full_spy, full_cb = fit(pl, tmp_path, decide_every_n_samples=12)
    _, _, _, saving_cb = fit(pl, tmp_path, callbacks=[SaveAt()], decide_every_n_samples=12)
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"][saving_cb.state_key]
    assert state["pending_factor"] == 2 and state["factor"] == 1
    trainer, resumed, spy, cb = fit(pl, tmp_path, ckpt=str(tmp_path / "mid.ckpt"), decide_every_n_samples=12)
    assert spy.rows == full_spy.rows[3:] and cb.history == full_cb.history
    for p, q in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_hessian_rule_duration_counts_decisions_and_history_names_the_trigger(tmp_path):
    """Duration 3 at one decision per 8 samples: growth at the 3rd decision (duration), then on a halving."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    eigenvalues = iter([10.0, 9.0, 8.0, 7.0, 3.0] + [3.0] * 20)
    _, _, _, cb = fit(pl, tmp_path, epochs=1, rule=HessianRule(eigenvalue_ratio=0.5, duration=3),
                      measure=lambda trainer, module: next(eigenvalues), decide_every_n_samples=8)
    grown = [(h["step"], h["measurement"], h["next_factor"], h["trigger"]) for h in cb.history if "trigger" in h]
    # decisions at steps 2, 4, 6 (x2: 3 decisions without growth), then every step at x2: 7.0 (7 <= 4? no),
    # 3.0 <= 0.5 x 8.0 (the reference reset at the last growth): x4
    assert grown == [(6, 8.0, 2, "duration"), (8, 3.0, 4, "eigenvalue")]
    assert all("trigger" not in h for h in cb.history if h["next_factor"] == h["factor"])


def test_interval_arguments_are_checked():
    """Both intervals, a zero interval, or an epoch ramp with an interval: errors naming the fix."""
    with pytest.raises(ValueError, match="not both"):
        AdaptiveBatchSize(rule="noise_scale", decide_every_n_steps=2, decide_every_n_samples=64)
    with pytest.raises(ValueError, match="Invalid decide_every_n_samples"):
        AdaptiveBatchSize(rule="noise_scale", decide_every_n_samples=0)
    with pytest.raises(ValueError, match="RampRule is a schedule by epoch: use it without decide_every_n_samples"):
        AdaptiveBatchSize(rule=RampRule({0: 1}), decide_every_n_samples=64)


def always_more(trainer, module) -> float:
    """A B_simple far above any batch here (module level: ddp_spawn pickles the callback)."""
    return 1e9


class SameAsOneProcess(lightning_package(PYTORCH_LIGHTNING).Callback):
    """Asserts inside each ddp_spawn worker: the same decisions (steps, factors) and weights as one process."""

    def __init__(self, abs_cb, expected_weights, expected_history):
        self.abs_cb, self.expected_weights, self.expected_history = abs_cb, expected_weights, expected_history

    def on_fit_end(self, trainer, pl_module):
        assert trainer.world_size == 2
        assert [(h["step"], h["factor"], h["next_factor"]) for h in self.abs_cb.history] == self.expected_history
        for p, q in zip(pl_module.parameters(), self.expected_weights, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_accumulation_sample_interval_two_ranks_equal_one_process(tmp_path):
    """ddp_spawn, 2 ranks at 2 per device == 1 process at 4: the interval counts global samples, same decisions."""
    pl = lightning_package(PYTORCH_LIGHTNING)
    _, reference, _, ref_cb = fit(pl, tmp_path, decide_every_n_samples=12)
    expected = [(h["step"], h["factor"], h["next_factor"]) for h in ref_cb.history]
    abs_cb = AdaptiveBatchSize(rule=NoiseScaleRule(margin=1.0), max_factor=4, decide_every_n_samples=12,
                               measure_fn=always_more)
    check = SameAsOneProcess(abs_cb, [p.detach().clone() for p in reference.parameters()], expected)
    trainer = make_trainer(pl, tmp_path, max_epochs=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                           num_sanity_val_steps=0, limit_val_batches=0,
                           callbacks=[LRSchedule(reference_batch_size=BATCH, log=False), abs_cb, check])
    module = classifier_module_class(pl.__name__)(net(), num_classes=3,
                                                  optimizer=sgd_factory(lr=LR, momentum=MOMENTUM, weight_decay=0.0))
    # each rank keeps its half of every 4 samples: together the one-process micro-batch
    trainer.fit(module, ResizableDataLoader(dataset(), ResizableBatchSampler(N, BATCH // 2, shuffle=False)))
