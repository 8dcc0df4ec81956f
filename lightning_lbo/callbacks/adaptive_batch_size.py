"""Grow the batch during training: one controller, a rule that decides, a mechanism that applies.

At every epoch end (or at the optimizer step that ends each interval of ``decide_every_n_steps``
steps or ``decide_every_n_samples`` training samples) the controller measures what its rule needs,
asks the rule for the next batch factor (:mod:`lightning_lbo.batch_rules`), caps it at
``max_factor``, makes every rank take rank 0's decision (a broadcast; measurements are all-reduced
first, so they agree anyway) and hands it to a mechanism (:mod:`lightning_lbo.callbacks.batch_mechanisms`):

* rules: ``"hessian"`` (ABS; Yao, Gholami, Keutzer, Mahoney 2018: the top Hessian eigenvalue on a
  fixed batch, power iteration in eval-mode BN), ``"noise_scale"`` (the simple gradient noise scale
  ``B_simple``, measured along the epoch by a :class:`~lightning_lbo.callbacks.GradientNoiseScale` in the
  same Trainer: per-rank against all-reduced gradients under DDP, a two-halves probe on one process),
  or a :class:`~lightning_lbo.batch_rules.RampRule` schedule;
* mechanisms: ``"accumulate"`` (gradient accumulation, BN sees the base batch, as in the paper) or
  ``"resize"`` (a larger per-device batch through a resizable batch sampler).

The LR follows the batch: with :class:`~lightning_lbo.callbacks.LRSchedule` in the Trainer, through
:meth:`LRSchedule.global_batch_changed` (its scaling rule, linear or sqrt, a re-warmup over
``rewarmup_steps`` steps and its momentum correction); without it (torch schedulers in
``configure_optimizers``), every LR is multiplied by the growth factor (linear rule), as ABS does.
With neither (a constant LR) that multiplication would be the run's only LR schedule, a jump of up
to ``max_factor`` at once, which cost test accuracy against fixed batch 128 on 3 seeds
(docs/adaptive_batch_size.md): refused at fit start, with the recommended ``LRSchedule`` pairing in the
message; ``scale_lr="linear"`` asks for it explicitly.
:class:`AdversarialTraining` halves its ratio on each doubling (ABSA), whatever the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from lightning_lbo._checks import positive_int
from lightning_lbo._dtensor import fsdp_unsharded
from lightning_lbo.batch_rules import BatchSizeRule, HessianRule, Observation, RampRule, make_rule
from lightning_lbo.callbacks._sharded import data_parallel_size, parameter_sharding, refuse_parameter_sharding
from lightning_lbo.callbacks.batch_mechanisms import MECHANISMS
from lightning_lbo.callbacks.hessian_spectrum import FSDP1_HVP_MESSAGE, FixedBatches
from lightning_lbo.callbacks.lr_schedule import LRSchedule
from lightning_lbo.compat import callback_bases, callback_state_key, lightning_package, package_of
from lightning_lbo.hessian import HessianOperator, classifier_loss, power_iteration
from lightning_lbo.hessian.hvp import BN_MODES, LossFn

#: ``measure_fn(trainer, pl_module) -> float`` replaces the measurement the rule needs (tests, other criteria).
MeasureFn = Callable[[Any, Any], float]
#: The LR pairing the setup errors recommend (measured in docs/adaptive_batch_size.md, "The first setup").
RECOMMENDED_LR_SCHEDULE = 'LRSchedule(reference_batch_size=<the base global batch>, scaling="sqrt")'
RECOMMENDED_REWARMUP_STEPS = 50
#: Param-group keys that hold a learning rate (torch schedulers keep "initial_lr"; OneCycleLR max/min).
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class AdaptiveBatchSize(*callback_bases()):
    """Grow the global batch between epochs, or between steps, as a rule decides (ABS, noise scale, ramp).

    Args:
        rule: ``"hessian"`` (default; configured by ``eigenvalue_ratio``/``duration``), ``"noise_scale"``
            or a :class:`~lightning_lbo.batch_rules.BatchSizeRule` (``NoiseScaleRule(margin=2)``,
            ``RampRule({0: 1, 2: 2})``).
        mechanism: ``"accumulate"`` (gradient accumulation) or ``"resize"`` (per-device batch; see
            :class:`~lightning_lbo.callbacks.batch_mechanisms.Resize` for its Trainer settings).
        max_factor: largest batch as a multiple of the base batch.
        duration, eigenvalue_ratio: of the default Hessian rule (paper: 10 epochs, 0.5).
        scale_lr: let the LR follow the batch: ``True`` through ``LRSchedule`` in the Trainer (or, without it,
            the torch schedulers' LRs multiplied by each growth; with neither, refused at fit start: add
            ``LRSchedule``), ``"linear"`` the same but also at a constant LR (every LR multiplied by each
            growth at once), ``False`` never (see the module docstring).
        rewarmup_steps: with LRSchedule, steps over which the LR ramps to its new value after a growth.
        decide_every_n_steps: decide every this many optimizer steps instead of at epoch ends (None).
        decide_every_n_samples: decide at the first optimizer step that completes each further this
            many training samples (global: all ranks, all micro-batches) instead of at epoch ends. The
            interval stays fixed in data as the batch grows, as the paper's once-per-epoch measurement
            does (a step interval stretches with the batch); a step holding more samples than the
            interval still decides once. Give at most one of the two intervals. With either, decisions
            fall between optimizer steps, mid-epoch: the resize sampler still covers every example
            once per epoch (a batch the loader had drawn before the decision keeps its size); with
            accumulation, a growth waits for the first step boundary that Lightning's accumulation
            windows (counted from the epoch's first batch) align with the new factor (at most one
            window of the old factor, or the epoch's end), so each window's loss normalisation and
            ``zero_grad`` stay right. Resume continues exactly. ``HessianRule``'s ``duration`` counts
            decisions; ``RampRule`` is a schedule by epoch and is rejected.
        power_iters, tol, num_batches, bn_mode, loss_fn, seed: the Hessian measurement (power-iteration
            steps, relative tolerance, fixed batches per process, BN mode, ``loss_fn(module, batch)``,
            start-vector seed).
        checkpoint_batches: store the Hessian's fixed batches in checkpoints (resume measures the same data).
        measure_fn: replaces the measurement (``fn(trainer, pl_module) -> float``).
        eigenvalue_fn: the same, older name.
        max_accumulation: older name of ``max_factor``.

    Logged every epoch: ``abs/factor``, ``abs/global_batch`` and the measurement (``abs/eigenvalue``
    or ``abs/b_simple``).

    Example::

        trainer = Trainer(max_epochs=30, callbacks=[
            LRSchedule(reference_batch_size=128, scaling="sqrt"),
            GradientNoiseScale(beta=0.9, probe_every_n_steps=20),
            AdaptiveBatchSize(rule=NoiseScaleRule(margin=1), max_factor=16, rewarmup_steps=50)])
    """

    def __init__(self, max_factor: int = 16, duration: int = 10, eigenvalue_ratio: float = 0.5,
                 scale_lr: bool = True, power_iters: int = 10, tol: float = 1e-2, num_batches: int = 1,
                 bn_mode: str = "eval", loss_fn: LossFn = classifier_loss, eigenvalue_fn: MeasureFn | None = None,
                 checkpoint_batches: bool = True, seed: int = 0, *, rule: BatchSizeRule | str = "hessian",
                 mechanism: str = "accumulate", rewarmup_steps: int = 0, measure_fn: MeasureFn | None = None,
                 max_accumulation: int | None = None, decide_every_n_steps: int | None = None,
                 decide_every_n_samples: int | None = None) -> None:
        super().__init__()
        max_factor = max_accumulation if max_accumulation is not None else max_factor
        for name, value in (("max_factor", max_factor), ("power_iters", power_iters), ("num_batches", num_batches)):
            positive_int(name, value)
        if scale_lr not in (True, False, "linear") or not isinstance(scale_lr, (bool, str)):
            raise ValueError(f"Invalid scale_lr: {scale_lr!r}; use True (LRSchedule), 'linear' or False.")
        if not isinstance(rewarmup_steps, int) or rewarmup_steps < 0:
            raise ValueError(f"Invalid rewarmup_steps: {rewarmup_steps!r}; use an integer >= 0.")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}; use a positive float.")
        if bn_mode not in BN_MODES:
            raise ValueError(f"Invalid bn_mode: {bn_mode!r}. Supported: {BN_MODES}.")
        if mechanism not in MECHANISMS:
            raise ValueError(f"Invalid mechanism: {mechanism!r}. Supported: {tuple(MECHANISMS)}.")
        for name, value in (("decide_every_n_steps", decide_every_n_steps),
                            ("decide_every_n_samples", decide_every_n_samples)):
            if value is not None:
                positive_int(name, value)
                if isinstance(rule, RampRule):
                    raise ValueError(f"RampRule is a schedule by epoch: use it without {name}.")
        if decide_every_n_steps is not None and decide_every_n_samples is not None:
            raise ValueError("Give decide_every_n_steps or decide_every_n_samples, not both.")
        if eigenvalue_fn is not None and measure_fn is not None:
            raise ValueError("Give measure_fn or eigenvalue_fn (its older name), not both.")
        measure_fn = measure_fn or eigenvalue_fn
        if measure_fn is not None and not callable(measure_fn):
            raise TypeError(f"measure_fn must be callable (trainer, pl_module) -> float, got {measure_fn!r}.")
        if rule == "hessian":
            rule = HessianRule(eigenvalue_ratio=eigenvalue_ratio, duration=duration)
        elif (duration, eigenvalue_ratio) != (10, 0.5):
            raise ValueError("duration and eigenvalue_ratio configure the default Hessian rule; pass them to the rule "
                             "object instead (HessianRule(eigenvalue_ratio=..., duration=...)).")
        self.rule = make_rule(rule)
        self.mechanism = MECHANISMS[mechanism]()
        self.max_factor, self.scale_lr, self.rewarmup_steps = max_factor, scale_lr, rewarmup_steps
        self.decide_every_n_steps, self.decide_every_n_samples = decide_every_n_steps, decide_every_n_samples
        self.samples_since_decision = 0  # decide_every_n_samples: training samples since the last decision
        self.pending_factor: int | None = None  # a growth decided mid-epoch, waiting for an aligned step
        self._seen_step: int | None = None
        self.power_iters, self.tol, self.bn_mode, self.loss_fn = power_iters, tol, bn_mode, loss_fn
        self.checkpoint_batches, self.seed, self.measure_fn = checkpoint_batches, seed, measure_fn
        self.fixed = FixedBatches(num_batches)
        self.factor = 1
        self.history: list[dict[str, Any]] = []
        self._lr_schedule: Any = None
        self._noise: Any = None
        self._loaded_batches: Any = None

    @property
    def state_key(self) -> str:
        return callback_state_key(self, rule=type(self.rule).__name__, max_factor=self.max_factor)

    @property
    def accumulation(self) -> int:
        """The current batch factor (older name, from when accumulation was the only mechanism)."""
        return self.factor

    @property
    def decides_between_steps(self) -> bool:
        """True when decisions come every N steps or samples rather than at epoch ends."""
        return self.decide_every_n_steps is not None or self.decide_every_n_samples is not None

    @property
    def at_maximum(self) -> bool:
        """True once the batch reached ``max_factor`` times the base batch."""
        return self.factor >= self.max_factor

    # ------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("AdaptiveBatchSize grows the batch of Lightning's automatic optimization loop, which "
                               "manual optimization bypasses: use automatic optimization or remove the callback.")
        pkg = lightning_package(package_of(trainer))
        for cb in trainer.callbacks:
            if isinstance(cb, pkg.callbacks.GradientAccumulationScheduler):
                raise ValueError("AdaptiveBatchSize and GradientAccumulationScheduler both change the batch: remove "
                                 "one of them.")
        self._refuse_sharded_measurement(trainer, None)
        self._lr_schedule = next((cb for cb in trainer.callbacks if isinstance(cb, LRSchedule)), None)
        if self.rewarmup_steps and self._lr_schedule is None:
            raise ValueError("rewarmup_steps needs LRSchedule in the Trainer (it ramps the LR); add "
                             "LRSchedule(reference_batch_size=...) or set rewarmup_steps=0.")
        if self.rule.needs == "b_simple" and self.measure_fn is None:
            from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale

            self._noise = next((cb for cb in trainer.callbacks if isinstance(cb, GradientNoiseScale)), None)
            if self._noise is None:
                pairing = "" if self._lr_schedule is not None or not self.scale_lr else (
                    f" For the LR as the batch grows, also add {RECOMMENDED_LR_SCHEDULE} and pass "
                    f"rewarmup_steps={RECOMMENDED_REWARMUP_STEPS} (the recommended pairing).")
                raise ValueError("The noise-scale rule reads B_simple from a GradientNoiseScale callback: add "
                                 "GradientNoiseScale(beta=0.9, probe_every_n_steps=20) to the Trainer's callbacks."
                                 + pairing)
        self.mechanism.setup(trainer)
        if self.decides_between_steps and trainer.accumulate_grad_batches != 1:
            raise ValueError("decide_every_n_steps/decide_every_n_samples resize the batch between optimizer steps, "
                             "which a fixed gradient accumulation (accumulate_grad_batches="
                             f"{trainer.accumulate_grad_batches}) would split: remove accumulate_grad_batches or "
                             "decide at epoch ends.")

    def _refuse_sharded_measurement(self, trainer: Any, pl_module: Any) -> None:
        """The built-in measurements: no Hessian under FSDP1, no B_simple under sharding without accumulation."""
        if self.measure_fn is not None or self.rule.needs is None:
            return
        instead = "use strategy='ddp', a RampRule, or measure_fn=..."
        if self.rule.needs == "eigenvalue":
            if parameter_sharding(trainer) == "FSDPStrategy":
                raise ValueError(FSDP1_HVP_MESSAGE.format(what="AdaptiveBatchSize(rule='hessian')"))
        elif trainer.accumulate_grad_batches < 2:
            refuse_parameter_sharding(trainer, pl_module, "AdaptiveBatchSize(rule='noise_scale')",
                                      "it reads B_simple from GradientNoiseScale, which under sharding compares the "
                                      "micro-batches of an accumulation window and so needs accumulate_grad_batches "
                                      ">= 2 from the first step", instead)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._refuse_sharded_measurement(trainer, pl_module)
        # here, not at setup: configure_optimizers (and so lr_scheduler_configs) runs between the two
        if self.scale_lr is True and self._lr_schedule is None and not trainer.lr_scheduler_configs:
            raise ValueError(
                "AdaptiveBatchSize(scale_lr=True) found no LRSchedule and no LR scheduler: each growth would multiply "
                f"every LR at once (up to {self.max_factor}x, no re-warmup), which lost test accuracy against a fixed "
                f"batch (docs/adaptive_batch_size.md). Add {RECOMMENDED_LR_SCHEDULE} to the Trainer's callbacks "
                f"and pass rewarmup_steps={RECOMMENDED_REWARMUP_STEPS} (recommended); or scale_lr=False to keep "
                "the LR as it is; or scale_lr='linear' to multiply it at each growth anyway.")
        if self._loaded_batches:
            self.fixed.load(self._loaded_batches, pl_module.device)
            self._loaded_batches = None
        if self.mechanism.name == "accumulate":
            trainer.accumulate_grad_batches = self.factor  # a resumed run continues at its batch size

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.mechanism.name == "resize":
            self.mechanism.start(trainer, self.factor)
        self._seen_step = trainer.global_step

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.mechanism.name == "resize":
            self.mechanism.check(trainer, self.factor)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.rule.needs == "eigenvalue":
            self.fixed.offer(batch)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.mechanism.on_batch_end(trainer)
        if not self.decides_between_steps:
            return
        # this batch's samples (a micro-batch of the base batch under accumulation), before any growth below
        self.samples_since_decision += self.global_batch(trainer) // trainer.accumulate_grad_batches
        if trainer.global_step == self._seen_step:
            return  # inside an accumulation window: no optimizer step yet
        self._seen_step = trainer.global_step  # already counts this batch's step
        if self.decide_every_n_steps is not None:
            due = trainer.global_step % self.decide_every_n_steps == 0
        else:
            due = self.samples_since_decision >= self.decide_every_n_samples
            if due:  # one decision per step at most; the remainder counts towards the next interval
                self.samples_since_decision %= self.decide_every_n_samples
        if due:
            self.decide(trainer, pl_module)
        if self.pending_factor is not None and self.mechanism.aligned(batch_idx + 1, self.pending_factor):
            self._grow(trainer, self.pending_factor)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.decides_between_steps:
            self.decide(trainer, pl_module)
        elif self.pending_factor is not None:  # the next epoch's windows start aligned with any factor
            self._grow(trainer, self.pending_factor)

    def decide(self, trainer: Any, pl_module: Any) -> None:
        """Measure, ask the rule, agree across ranks, log, and grow if the rule says so."""
        value = self.measure(trainer, pl_module)
        global_batch = self.global_batch(trainer)
        current = self.pending_factor or self.factor  # a growth still waiting to apply counts as taken
        obs = Observation(epoch=trainer.current_epoch, factor=current, global_batch=self.global_batch(trainer, current),
                          eigenvalue=value if self.rule.needs == "eigenvalue" else None,
                          b_simple=value if self.rule.needs == "b_simple" else None)
        wanted = min(max(self.rule.decide(obs), current), self.max_factor)
        new = int(trainer.strategy.broadcast(wanted))  # rank 0's decision on every rank
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "factor": self.factor,
               "global_batch": global_batch, "measurement": value, "next_factor": new}
        if new != current and getattr(self.rule, "last_trigger", None):
            row["trigger"] = self.rule.last_trigger
        self.history.append(row)
        if self.rule.needs is not None:
            name = "eigenvalue" if self.rule.needs == "eigenvalue" else "b_simple"
            pl_module.log(f"abs/{name}", float(value), on_epoch=True)
        pl_module.log("abs/factor", float(self.factor), on_epoch=True)
        pl_module.log("abs/global_batch", float(global_batch), on_epoch=True)
        if new != current:
            self.pending_factor = new
            if not self.decides_between_steps:
                self._grow(trainer, new)  # at the epoch's end: every mechanism applies it at once

    def global_batch(self, trainer: Any, factor: int | None = None) -> int:
        """Global batch at ``factor`` (default: the current one): base per-device batch x factor x data ranks."""
        per_device = self.mechanism.base_batch if self.mechanism.name == "resize" else _loader_batch(trainer)
        return int(per_device * (factor or self.factor) * data_parallel_size(trainer))

    def measure(self, trainer: Any, pl_module: Any) -> float | None:
        """What the rule needs: the top Hessian eigenvalue, ``B_simple`` (mean over ranks), or nothing."""
        if self.rule.needs is None:
            return None
        if self.measure_fn is not None:
            return float(self.measure_fn(trainer, pl_module))
        if self.rule.needs == "eigenvalue":
            with fsdp_unsharded(pl_module):  # fully_shard: the full parameters, for autograd to reach (collective)
                op = HessianOperator(pl_module, self.fixed.batches, loss_fn=self.loss_fn, bn_mode=self.bn_mode)
                result = power_iteration(op, k=1, max_iters=self.power_iters, tol=self.tol, seed=self.seed)
                op.release()
            return result.eigenvalues[0]
        return self._noise.reduced_b_simple(trainer)  # a collective and one host sync per epoch

    def _grow(self, trainer: Any, new: int) -> None:
        growth = new / self.factor
        self.factor, self.pending_factor = new, None
        per_device = self.mechanism.apply(trainer, new)
        if not self.scale_lr:
            return
        if self._lr_schedule is not None:
            self._lr_schedule.global_batch_changed(trainer, per_device_batch_size=per_device,
                                                   rewarmup_steps=self.rewarmup_steps)
            return
        for opt in trainer.optimizers:  # torch schedulers: every LR follows the batch (linear rule)
            for group in opt.param_groups:
                for key in LR_KEYS:
                    value = group.get(key)
                    if isinstance(value, torch.Tensor):  # tensor LRs (capturable optimizers): in place
                        value.mul_(growth)
                    elif isinstance(value, (int, float)):
                        group[key] = value * growth
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * growth for lr in config.scheduler.base_lrs]

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"factor": self.factor, "rule": self.rule.state_dict(), "mechanism": self.mechanism.state_dict(),
                 "history": list(self.history), "samples_since_decision": self.samples_since_decision,
                 "pending_factor": self.pending_factor}
        if self.checkpoint_batches and self.rule.needs == "eigenvalue":
            state["fixed_batches"] = self.fixed.to_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = int(state_dict.get("factor", state_dict.get("accumulation", 1)))
        self.rule.load_state_dict(state_dict.get("rule", state_dict))  # older checkpoints kept the rule's keys flat
        self.mechanism.load_state_dict(state_dict.get("mechanism", {}))
        self.history = list(state_dict.get("history", []))
        self.samples_since_decision = int(state_dict.get("samples_since_decision", 0))
        self.pending_factor = state_dict.get("pending_factor")
        self._loaded_batches = state_dict.get("fixed_batches")


def _loader_batch(trainer: Any) -> int:
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if not size:
        raise ValueError("AdaptiveBatchSize could not read the per-device batch size from the train DataLoader "
                         f"({type(loader).__name__}).")
    return int(size)
