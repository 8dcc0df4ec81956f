"""LRSchedule over real Trainer runs: the LR of every optimizer step equals the closed-form schedule."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo import schedules as S
from lightning_lbo.callbacks import LRSchedule
from lightning_lbo.compat import callback_bases, lightning_package
from lightning_lbo.param_groups import param_groups
from tests.conftest import make_trainer

N_SAMPLES, BATCH = 40, 4  # 10 batches per epoch on one device, 5 per rank with two


class LRInBufferSGD(torch.optim.Optimizer):
    """Goyal's / the LARS paper's momentum form: v = m v + lr (g + wd w); w -= v."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                d = p.grad + group["weight_decay"] * p
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = group["lr"] * d
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(state["momentum_buffer"])
        return loss


@cache
def _module_class(package: str) -> type:
    pl = lightning_package(package)

    class TinyNet(pl.LightningModule):
        """Linear + BatchNorm on fixed random data; two param groups with different base LRs."""

        def __init__(self, lr: float = 0.1, momentum: float = 0.9, scheduler: bool | S.Schedule = False,
                     no_groups: bool = False, batch_size: int | None = BATCH, lr_in_buffer: bool = False) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
            self.lr, self.momentum, self.scheduler = lr, momentum, scheduler
            self.no_groups, self.batch_size, self.lr_in_buffer = no_groups, batch_size, lr_in_buffer

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            data = TensorDataset(torch.randn(N_SAMPLES, 3, generator=g), torch.randint(0, 2, (N_SAMPLES,), generator=g))
            if self.batch_size is None:  # a sampler that yields whole batches: no batch size to read
                return DataLoader(data, batch_size=None, sampler=[list(range(i, i + BATCH))
                                                                  for i in range(0, N_SAMPLES, BATCH)])
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)

        def configure_optimizers(self):
            groups = param_groups(self, weight_decay=1e-4, lr=self.lr, lr_multipliers={"no_decay": 0.5})
            sgd = LRInBufferSGD if self.lr_in_buffer else torch.optim.SGD
            opt = sgd(groups, lr=self.lr, momentum=self.momentum)
            if callable(self.scheduler):  # a step -> multiplier: the LambdaLR adapter
                return S.lightning_scheduler(opt, self.scheduler)
            if self.scheduler:
                return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]
            if self.no_groups:
                opt.param_groups.clear()
            return opt

    # Picklable for ddp_spawn: a module-level name per package.
    TinyNet.__qualname__ = TinyNet.__name__ = f"TinyNet_{package.replace('.', '_')}"
    globals()[TinyNet.__qualname__] = TinyNet
    return TinyNet


_module_class("pytorch_lightning")


class LRRecorder(*callback_bases()):
    """Records the LR of every group at every optimizer step, and momentum buffers around LRSchedule's hook."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.bufs_before: dict[int, list[torch.Tensor]] = {}
        self.bufs_at_step: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _bufs(opt):
        return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
                if "momentum_buffer" in opt.state.get(p, {})]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.bufs_before.setdefault(trainer.global_step, self._bufs(trainer.optimizers[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert trainer.global_step not in self.lrs, "two optimizer steps with the same global_step"
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]
        self.bufs_at_step[trainer.global_step] = self._bufs(optimizer)


def goyal_poly(t: int, k: float, warmup: int, total: int, power: float = 2.0) -> float:
    """Closed form: linear warmup from 1/k to 1 over `warmup` steps, then (1 - s/(T - W))^p."""
    if t < warmup:
        return 1 / k + (1 - 1 / k) * t / warmup
    return (1 - (t - warmup) / (total - warmup)) ** power


def _fit(pl, tmp_path, callbacks, module=None, ckpt_path=None, **trainer_kw):
    module = module or _module_class(pl.__name__)()
    trainer = make_trainer(pl, tmp_path, callbacks=callbacks, **trainer_kw)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_schedule_sequence_equals_closed_form(pl_package, tmp_path, accumulate):
    """Warmup 1 epoch + poly(2) with linear scaling: every step's LR, both groups, accumulation 1 and 3."""
    rec = LRRecorder()
    cb = LRSchedule(warmup_epochs=1, decay="poly", power=2, reference_batch_size=2)
    trainer, _ = _fit(pl_package, tmp_path, [cb, rec], max_epochs=3, accumulate_grad_batches=accumulate)
    steps_per_epoch = math.ceil(10 / accumulate)  # Lightning steps on the last, shorter window too
    total = 3 * steps_per_epoch
    k = BATCH * accumulate / 2
    assert cb.global_batch_size == BATCH * accumulate and cb.scale == k
    assert sorted(rec.lrs) == list(range(total))
    for t, (lr_decay, lr_no_decay) in rec.lrs.items():
        m = goyal_poly(t, k, steps_per_epoch, total)
        assert lr_decay == pytest.approx(0.1 * k * m, rel=1e-12, abs=1e-15)
        assert lr_no_decay == pytest.approx(0.05 * k * m, rel=1e-12, abs=1e-15)
    assert rec.lrs[0][0] == pytest.approx(0.1)  # Goyal: warmup starts at the unscaled LR
    assert rec.lrs[steps_per_epoch][0] == pytest.approx(0.1 * k)
    last = goyal_poly(total - 1, k, steps_per_epoch, total)
    assert float(trainer.callback_metrics["lr/decay"]) == pytest.approx(0.1 * k * last, rel=1e-6)
    assert float(trainer.callback_metrics["lr/no_decay"]) == pytest.approx(0.05 * k * last, rel=1e-6)


@pytest.mark.parametrize("kwargs, expected", [
    # sqrt scaling (k = sqrt(4 / 1) = 2), MLPerf warmup from 0 over 3 steps, cosine to 0.1 over the rest (27 steps)
    (dict(warmup_steps=3, warmup_start_factor=0.0, decay="cosine", end_factor=0.1, reference_batch_size=1,
          scaling="sqrt"),
     lambda t: 2 * (t / 3 if t < 3 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 3) / 27)))),
    # Goyal's step decay (milestones in epochs) after a 1-step warmup from 0.5
    (dict(warmup_steps=1, warmup_start_factor=0.5, decay="step", milestones=(1, 2), gamma=0.1),
     lambda t: (0.5 if t == 0 else 1.0) * 0.1 ** (t // 10)),
    # Akiba's slow start scaled to 3 epochs: boundaries 40/70/85 of 90 -> 13.33, 23.33, 28.33 steps
    (dict(decay="slow_start", scale_slow_start=True),
     lambda t: 0.5 if t < 40 / 3 else 0.075 if t < 70 / 3 else 0.01 if t < 85 / 3 else 0.001),
    # constant warmup over half an epoch, no scaling, then constant
    (dict(warmup_epochs=0.5, warmup="constant", warmup_start_factor=0.25),
     lambda t: 0.25 if t < 5 else 1.0),
])
def test_lr_schedule_variants_equal_closed_form(tmp_path, kwargs, expected):
    """sqrt scaling, MLPerf warmup, cosine, step milestones, Akiba slow-start, constant warmup: step by step."""
    pl = lightning_package("pytorch_lightning")
    rec = LRRecorder()
    _fit(pl, tmp_path, [LRSchedule(**kwargs), rec], max_epochs=3)
    assert sorted(rec.lrs) == list(range(30))
    for t, (lr, _) in rec.lrs.items():
        assert lr == pytest.approx(0.1 * expected(t), rel=1e-12, abs=1e-15), t


def test_lr_schedule_momentum_correction_scales_buffers(tmp_path):
    """With momentum_correction the buffers are multiplied by lr_t / lr_{t-1} exactly when the LR changes."""
    pl = lightning_package("pytorch_lightning")
    rec = LRRecorder()
    cb = LRSchedule(warmup_steps=4, warmup_start_factor=0.2, decay="step", milestone_steps=(7,), gamma=0.1,
                    momentum_correction=True)
    _fit(pl, tmp_path, [rec, cb], max_steps=10)
    for t in range(1, 10):
        ratio = rec.lrs[t][0] / rec.lrs[t - 1][0]
        assert ratio != 1.0 or t in (5, 6, 8, 9)
        for before, after in zip(rec.bufs_before[t], rec.bufs_at_step[t], strict=True):
            torch.testing.assert_close(after, before * ratio, rtol=1e-6, atol=0)
    assert rec.lrs[7][0] / rec.lrs[6][0] == pytest.approx(0.1)


def _epoch_ckpt_trainer_kwargs(pl, tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_epochs=1, save_top_k=-1)
    return ckpt, dict(enable_checkpointing=True)


def test_lr_schedule_resume_at_each_phase_boundary(tmp_path):
    """Resuming at the warmup end and at each milestone (epoch ends) continues the same LRs and weights."""
    pl = lightning_package("pytorch_lightning")
    kw = dict(warmup_epochs=1, decay="step", milestones=(2, 3), reference_batch_size=1, momentum_correction=True)
    full_rec = LRRecorder()
    ckpt, tkw = _epoch_ckpt_trainer_kwargs(pl, tmp_path)
    _, full = _fit(pl, tmp_path, [LRSchedule(**kw), full_rec, ckpt], max_epochs=4, **tkw)
    for step in (10, 20, 30):  # warmup end (epoch 1), milestones at epochs 2 and 3
        rec = LRRecorder()
        _, resumed = _fit(pl, tmp_path / f"r{step}", [LRSchedule(**kw), rec], max_epochs=4,
                          ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert sorted(rec.lrs) == list(range(step, 40))
        assert all(rec.lrs[t] == pytest.approx(full_rec.lrs[t], rel=1e-12) for t in rec.lrs)
        for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lr_schedule_resume_mid_warmup_both_packages(pl_package, tmp_path):
    """Step checkpoints in the warmup and at its end (mid-epoch) resume on the same LR sequence."""
    kw = dict(warmup_steps=6, decay="poly", power=2, reference_batch_size=1)
    full_rec = LRRecorder()
    ckpt = pl_package.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1,
                                                save_top_k=-1)
    _fit(pl_package, tmp_path, [LRSchedule(**kw), full_rec, ckpt], max_steps=16, enable_checkpointing=True)
    for step in (3, 6):  # mid-warmup and at the warmup end, both mid-epoch
        rec = LRRecorder()
        _fit(pl_package, tmp_path / f"r{step}", [LRSchedule(**kw), rec], max_steps=16,
             ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert sorted(rec.lrs) == list(range(step, 16))
        assert all(rec.lrs[t] == pytest.approx(full_rec.lrs[t], rel=1e-12) for t in rec.lrs)


class _AssertDDPSequence(*callback_bases()):
    """Runs inside each ddp_spawn worker: global batch = 4 x 2 ranks x accumulation, LRs = closed form."""

    def __init__(self, schedule: LRSchedule, accumulate: int) -> None:
        self.schedule, self.accumulate, self.lrs = schedule, accumulate, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module):
        assert trainer.world_size == 2
        k = BATCH * 2 * self.accumulate / 4
        assert self.schedule.global_batch_size == BATCH * 2 * self.accumulate and self.schedule.scale == k
        spe = math.ceil(5 / self.accumulate)
        total = 2 * spe
        assert sorted(self.lrs) == list(range(total))
        for t, lr in self.lrs.items():
            assert lr == pytest.approx(0.1 * k * goyal_poly(t, k, spe, total), rel=1e-12, abs=1e-15)


def test_lr_schedule_ddp_spawn_two_processes(tmp_path):
    """2 CPU processes (ddp_spawn, gloo), accumulation 2: the global batch and LR sequence are right on each rank."""
    pl = lightning_package("pytorch_lightning")
    cb = LRSchedule(warmup_epochs=1, decay="poly", reference_batch_size=4)
    _fit(pl, tmp_path, [cb, _AssertDDPSequence(cb, 2)], max_epochs=2, accumulate_grad_batches=2,
         strategy="ddp_spawn", devices=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reference_batch_size=0), "Invalid reference_batch_size"),
    (dict(warmup_steps=-1, warmup_start_factor=0.1), "Invalid warmup_steps"),
    (dict(warmup_epochs=float("nan"), warmup_start_factor=0.1), "Invalid warmup_epochs"),
    (dict(warmup_epochs=1, warmup_steps=10, warmup_start_factor=0.1), "not both"),
    (dict(warmup_steps=5), "give warmup_start_factor"),
    (dict(warmup_steps=5, warmup_start_factor=-0.5), "Invalid warmup_start_factor"),
    (dict(decay="poly", end_factor=-0.1), "must not become negative"),
    (dict(decay="linear"), "Supported"),
    (dict(scaling="cubic", reference_batch_size=256), "Supported"),
    (dict(decay="step"), "needs milestones"),
    (dict(milestones=(30,)), "only apply"),
    (dict(scale_slow_start=True, decay="poly"), "only applies"),
    (dict(schedule=lambda t: 1.0, warmup_steps=3), "not both"),
    (dict(batch_size=0), "Invalid batch_size"),
])
def test_lr_schedule_bad_arguments_raise(kwargs, match):
    """Bad configuration fails at construction with the fix named."""
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


@pytest.mark.parametrize("kwargs, module_kw, match", [
    (dict(warmup_epochs=4, warmup_start_factor=0.1), {}, "longer than training"),
    (dict(warmup_epochs=3, warmup_start_factor=0.1, decay="poly"), {}, "No steps are left"),
    (dict(schedule=lambda t: 1.0 - t / 5), {}, "at step 6"),
    (dict(), dict(scheduler=True), "also returned an lr_scheduler"),
    (dict(), dict(no_groups=True), "no param_groups"),
    (dict(reference_batch_size=256), dict(batch_size=None), "LRSchedule\\(batch_size=...\\)"),
])
def test_lr_schedule_setup_errors(tmp_path, kwargs, module_kw, match):
    """Warmup longer than training, a negative schedule, a competing scheduler: clear errors before step 0."""
    pl = lightning_package("pytorch_lightning")
    rec = LRRecorder()
    with pytest.raises(ValueError, match=match):
        _fit(pl, tmp_path, [LRSchedule(**kwargs), rec], module=_module_class(pl.__name__)(**module_kw), max_epochs=3)
    assert rec.lrs == {}


def test_lr_schedule_custom_schedule_and_explicit_batch_size(tmp_path):
    """A custom step -> multiplier runs as given; batch_size= overrides the DataLoader (here unreadable)."""
    pl = lightning_package("pytorch_lightning")
    rec = LRRecorder()
    cb = LRSchedule(schedule=lambda t: 1.0 / (1 + t), reference_batch_size=8, batch_size=BATCH * 4)
    _fit(pl, tmp_path, [cb, rec], module=_module_class(pl.__name__)(batch_size=None), max_steps=7)
    assert cb.global_batch_size == 16 and cb.scale == 2.0
    assert [rec.lrs[t][0] for t in range(7)] == pytest.approx([0.2 / (1 + t) for t in range(7)], rel=1e-12)


def test_lr_schedule_warns_when_resumed_batch_size_changes(tmp_path):
    """Resuming with another global batch size rescales the LR to the new batch, with a warning."""
    pl = lightning_package("pytorch_lightning")
    kw = dict(warmup_steps=2, decay="cosine", reference_batch_size=4, total_steps=12)
    trainer, _ = _fit(pl, tmp_path, [LRSchedule(**kw)], max_steps=4)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    rec = LRRecorder()
    with pytest.warns(UserWarning, match="global batch size changed from 4"):
        _fit(pl, tmp_path / "b", [LRSchedule(**kw), rec], max_steps=6, accumulate_grad_batches=2,
             ckpt_path=tmp_path / "a.ckpt")
    m = 0.5 * (1 + math.cos(math.pi * (4 - 2) / 10))
    assert rec.lrs[4][0] == pytest.approx(0.1 * 2 * m, rel=1e-12)


def test_lr_schedule_follows_accumulation_changes(tmp_path):
    """When accumulate_grad_batches changes (GradientAccumulationScheduler), the scaling rule follows the batch."""
    pl = lightning_package("pytorch_lightning")
    rec = LRRecorder()
    cb = LRSchedule(reference_batch_size=4, total_steps=15)
    accumulation = pl.callbacks.GradientAccumulationScheduler({0: 1, 1: 2})
    _fit(pl, tmp_path, [accumulation, cb, rec], max_epochs=2)
    assert sorted(rec.lrs) == list(range(15))  # 10 steps of batch 4, then 5 of batch 8
    assert [rec.lrs[t][0] for t in range(15)] == pytest.approx([0.1] * 10 + [0.2] * 5, rel=1e-12)
    assert cb.global_batch_size == 8


def test_lambda_lr_adapter_in_trainer_equals_callback(tmp_path):
    """The LambdaLR adapter returned from configure_optimizers steps per optimizer step, like LRSchedule."""
    pl = lightning_package("lightning.pytorch")
    sched = S.warmup_then(S.poly(6, power=2.0), warmup_steps=2, start_factor=0.0)
    via_adapter, via_callback = LRRecorder(), LRRecorder()
    _fit(pl, tmp_path / "a", [via_adapter], module=_module_class(pl.__name__)(scheduler=sched), max_epochs=2,
         accumulate_grad_batches=3)
    _fit(pl, tmp_path / "b", [LRSchedule(schedule=sched), via_callback], max_epochs=2, accumulate_grad_batches=3)
    assert sorted(via_adapter.lrs) == list(range(8))
    assert via_adapter.lrs == via_callback.lrs
    assert [via_adapter.lrs[t][0] for t in range(8)] == pytest.approx([0.1 * sched(t) for t in range(8)], rel=1e-12)


def test_lr_schedule_momentum_correction_matches_lr_outside_buffer(tmp_path):
    """Goyal 2.1: LR-in-buffer momentum + correction = torch.optim.SGD, through warmup and a 10x drop."""
    pl = lightning_package("pytorch_lightning")
    kw = dict(warmup_steps=5, warmup_start_factor=0.1, decay="step", milestone_steps=(9,), gamma=0.1)
    module_cls = _module_class(pl.__name__)
    runs = {}
    for name, lr_in_buffer, correction in (("torch", False, False), ("corrected", True, True),
                                            ("uncorrected", True, False)):
        torch.manual_seed(0)  # same initial weights in every run
        _, runs[name] = _fit(pl, tmp_path / name, [LRSchedule(momentum_correction=correction, **kw)],
                             module=module_cls(lr_in_buffer=lr_in_buffer), max_steps=14)
    for a, b in zip(runs["torch"].parameters(), runs["corrected"].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    diff = max((a - c).abs().max().item() for a, c in zip(runs["torch"].parameters(), runs["uncorrected"].parameters(),
                                                           strict=True))
    assert diff > 1e-3  # without the correction the LR changes reach the weights differently


def test_lr_schedule_momentum_correction_reaches_lars_scaled_buffer():
    """Momentum correction uses an optimizer's own scale_momentum_ (LARS keeps scale x buffer)."""
    from lightning_lbo.optim.lars import LARS
    from lightning_lbo.optim.momentum import scale_momentum_

    w = torch.nn.Parameter(torch.ones(3))
    opt = LARS([w], lr=0.1, momentum=0.9, momentum_form="paper")
    w.grad = torch.full((3,), 0.5)
    opt.step()
    before = opt.momentum_buffer(w).clone()
    scale_momentum_(opt, 2.0, opt.param_groups[0])
    torch.testing.assert_close(opt.momentum_buffer(w), 2.0 * before)


@pytest.mark.parametrize("log", [True, False])
def test_lr_schedule_log_flag_survives_the_trainer(tmp_path, log):
    """log=False logs no LR: Lightning overwrites every callback's ``log`` attribute with ``pl_module.log``."""
    import pytorch_lightning as pl

    trainer, _ = _fit(pl, tmp_path, [LRSchedule(reference_batch_size=BATCH, log=log)], max_epochs=1)
    assert ("lr/decay" in trainer.callback_metrics) is log
