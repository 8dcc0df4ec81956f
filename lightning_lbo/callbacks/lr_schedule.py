"""``LRSchedule``: large-batch LR scaling, warmup and decay applied once per optimizer step.

Goyal et al. 2017 (arXiv 1706.02677): scale the LR with the global batch size (linear rule,
``lr = base_lr * B / B_ref``), warm up gradually from the unscaled LR, then decay; with the LR inside
the momentum buffer, rescale the buffer by ``lr_new / lr_old`` when the LR changes ("momentum
correction"). The schedules themselves are the pure functions of :mod:`lightning_lbo.schedules`;
this callback decides *when* they apply (before every optimizer step, keyed on
``trainer.global_step``, so gradient accumulation and epoch ends never shift them) and logs the LR.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_lbo import schedules as S
from lightning_lbo.callbacks._sharded import data_parallel_size
from lightning_lbo.compat import callback_bases, callback_state_key
from lightning_lbo.optim.momentum import correction_factor, scale_momentum_

WARMUPS = ("linear", "constant", "exponential")
DECAYS = ("constant", "poly", "cosine", "step", "slow_start")
SCALINGS = ("linear", "sqrt")
_CHECK_LIMIT = 1_000_000  # schedules up to this many steps are checked for negative values in setup


def _check_duration(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value) or value < 0):
        raise ValueError(f"Invalid {name}: {value!r}; use a finite number >= 0.")


def _one_of(epochs_name: str, epochs: Any, steps_name: str, steps: Any) -> None:
    if epochs is not None and steps is not None:
        raise ValueError(f"Give {epochs_name} or {steps_name}, not both "
                         f"({epochs_name}={epochs}, {steps_name}={steps}).")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


class LRSchedule(*callback_bases()):
    r"""Scale every param group's LR to the global batch size and run a warmup + decay schedule.

    The step with index ``t`` (``trainer.global_step`` before it) runs at

    .. math:: \mathrm{lr}_g(t) = \mathrm{lr}_g \cdot k \cdot m(t), \qquad
              k = B / B_\mathrm{ref} \ (\text{linear}) \text{ or } \sqrt{B / B_\mathrm{ref}} \ (\text{sqrt}),

    where ``lr_g`` is the LR of param group ``g`` as built in ``configure_optimizers`` (the LR for
    the reference batch ``B_ref``), ``B`` = per-device batch x devices x num_nodes x
    ``accumulate_grad_batches`` (data-parallel ranks only: under ``ModelParallelStrategy`` its
    ``data_parallel_size``) (re-read whenever ``accumulate_grad_batches`` changes, e.g. under
    Lightning's ``GradientAccumulationScheduler``) and ``m`` is the warmup-then-decay multiplier of
    :mod:`lightning_lbo.schedules`. The warmup starts at ``warmup_start_factor`` (default: Goyal's
    ``1/k``, i.e. at the unscaled LR) and reaches ``m = 1`` at step ``warmup_steps``. ``poly`` and
    ``cosine`` decay over the steps after warmup; ``step`` milestones and ``slow_start`` epochs count
    from step 0 and the warmup ramp multiplies them. A warmup that does not fit the run is an error,
    except in a run the Trainer cut short (``fast_dev_run``, ``max_steps`` below ``max_epochs``):
    there it shrinks to half the run, with a warning.

    Args:
        warmup_epochs: warmup length in (fractional) epochs; or give ``warmup_steps``.
        warmup_steps: warmup length in optimizer steps.
        warmup: ``"linear"`` (Goyal's gradual warmup), ``"constant"`` or ``"exponential"``.
        warmup_start_factor: multiplier at step 0 (0 = MLPerf-style warmup from zero). Default
            ``min(1, 1/k)``; without ``reference_batch_size`` a warmup needs it explicitly.
        decay: ``"constant"``, ``"poly"`` (LARS), ``"cosine"``, ``"step"`` (Goyal) or ``"slow_start"`` (Akiba).
        power: exponent of ``"poly"`` (2 in LARS/MLPerf).
        end_factor: final multiplier of ``"poly"``/``"cosine"``.
        milestones: epochs at which ``"step"`` multiplies by ``gamma`` (Goyal: 30, 60, 80); or ``milestone_steps``.
        milestone_steps: the milestones in optimizer steps.
        gamma: factor of ``"step"``.
        scale_slow_start: scale Akiba's 40/70/85-of-90 epoch boundaries to this run's length.
        total_epochs: training length for the decay (default: the Trainer's ``estimated_stepping_batches``);
            or give ``total_steps``.
        total_steps: training length in optimizer steps.
        schedule: a custom ``step -> multiplier`` replacing the warmup/decay arguments.
        reference_batch_size: the batch size the configured LRs are meant for; ``None`` = no scaling.
        scaling: ``"linear"`` (Goyal) or ``"sqrt"``.
        batch_size: per-device batch size when it cannot be read from the train DataLoader.
        momentum_correction: multiply each ``momentum_buffer`` in the optimizer state by
            ``lr_new / lr_old`` when the LR changes. Right for optimizers whose LR sits inside the
            buffer (``v = m v + lr g``: Goyal's and LARS's paper form); wrong for ``torch.optim.SGD``,
            whose buffer holds no LR.
        log: log each param group's LR as ``lr/<group name or pgN>`` every step.

    Example::

        trainer = Trainer(devices=8, num_nodes=4, callbacks=[
            LRSchedule(warmup_epochs=5, decay="poly", power=2, reference_batch_size=256)])
    """

    def __init__(self, warmup_epochs: float | None = None, warmup_steps: int | None = None, warmup: str = "linear",
                 warmup_start_factor: float | None = None, decay: str = "constant", power: float = 2.0,
                 end_factor: float = 0.0, milestones: Sequence[float] | None = None,
                 milestone_steps: Sequence[int] | None = None, gamma: float = 0.1, scale_slow_start: bool = False,
                 total_epochs: float | None = None, total_steps: int | None = None, schedule: S.Schedule | None = None,
                 reference_batch_size: int | None = None, scaling: str = "linear", batch_size: int | None = None,
                 momentum_correction: bool = False, log: bool = True) -> None:
        super().__init__()
        _one_of("warmup_epochs", warmup_epochs, "warmup_steps", warmup_steps)
        _one_of("milestones", milestones, "milestone_steps", milestone_steps)
        _one_of("total_epochs", total_epochs, "total_steps", total_steps)
        for name, value in (("warmup_epochs", warmup_epochs), ("warmup_steps", warmup_steps),
                            ("total_epochs", total_epochs), ("total_steps", total_steps)):
            _check_duration(name, value)
        if warmup not in WARMUPS:
            raise ValueError(f"Invalid warmup: {warmup!r}. Supported: {WARMUPS}.")
        if decay not in DECAYS:
            raise ValueError(f"Invalid decay: {decay!r}. Supported: {DECAYS}.")
        if scaling not in SCALINGS:
            raise ValueError(f"Invalid scaling: {scaling!r}. Supported: {SCALINGS}.")
        if reference_batch_size is not None and not _is_positive_int(reference_batch_size):
            raise ValueError(f"Invalid reference_batch_size: {reference_batch_size!r}; give the positive batch size "
                             "the configured LRs are tuned for (Goyal: 256), or None for no scaling.")
        if batch_size is not None and not _is_positive_int(batch_size):
            raise ValueError(f"Invalid batch_size: {batch_size!r}; give the positive per-device batch size.")
        if schedule is not None:
            if not callable(schedule):
                raise TypeError(f"Invalid schedule: {schedule!r}; give a callable step -> multiplier.")
            if warmup_epochs or warmup_steps or decay != "constant":
                raise ValueError("Give either schedule= or the warmup/decay arguments, not both: put the warmup "
                                 "into the custom schedule (lightning_lbo.schedules.warmup_then).")
        has_warmup = bool(warmup_epochs or warmup_steps)
        if warmup_start_factor is not None:
            S._finite_nonneg("warmup_start_factor", warmup_start_factor, "use a value >= 0 (0 = warmup from zero)")
            if warmup == "exponential" and not 0 < warmup_start_factor <= 1:
                raise ValueError(f"Invalid warmup_start_factor: {warmup_start_factor}; exponential warmup needs "
                                 "0 < warmup_start_factor <= 1.")
        elif has_warmup and reference_batch_size is None:
            raise ValueError("A warmup needs a start: give warmup_start_factor (e.g. 0.0 for MLPerf-style, 0.1) or "
                             "reference_batch_size (Goyal: start at the unscaled LR, factor 1/k).")
        if decay == "poly":
            S.Poly(1, power, end_factor)
        if decay in ("poly", "cosine"):
            S._finite_nonneg("end_factor", end_factor, "use a value >= 0 (the LR must not become negative)")
        if decay == "step":
            if not (milestones or milestone_steps):
                raise ValueError('decay="step" needs milestones (epochs, Goyal: (30, 60, 80)) or milestone_steps.')
            S.step_decay(milestones or milestone_steps, gamma)
        elif milestones or milestone_steps:
            raise ValueError(f'milestones only apply to decay="step", got decay={decay!r}.')
        if scale_slow_start and decay != "slow_start":
            raise ValueError(f'scale_slow_start only applies to decay="slow_start", got decay={decay!r}.')
        self.warmup_epochs, self.warmup_steps, self.warmup = warmup_epochs, warmup_steps, warmup
        self.warmup_start_factor = warmup_start_factor
        self.decay, self.power, self.end_factor, self.gamma = decay, power, end_factor, gamma
        self.milestones = tuple(milestones) if milestones else None
        self.milestone_steps = tuple(milestone_steps) if milestone_steps else None
        self.scale_slow_start = scale_slow_start
        self.total_epochs, self.total_steps = total_epochs, total_steps
        self.custom_schedule = schedule
        self.reference_batch_size, self.scaling, self.batch_size = reference_batch_size, scaling, batch_size
        # Not ``self.log``: Lightning overwrites every callback's ``log`` attribute with ``pl_module.log``.
        self.momentum_correction, self.log_lr = momentum_correction, log
        # Filled in setup: the step -> multiplier and the factors it multiplies.
        self.schedule: S.Schedule | None = None
        self.global_batch_size: int | None = None
        self.scale = 1.0
        self.base_lrs: list[list[float]] | None = None
        self._loaded_base_lrs: list[list[float]] | None = None
        self._fresh_base_lrs: list[list[float]] = []
        self._loaded_batch_size: int | None = None
        self._per_device_batch, self._accumulation = 0, 1
        self._last_lrs: list[list[float]] = []
        self._applied_step: int | None = None
        # Set by global_batch_changed (AdaptiveBatchSize): the schedule's clock and the re-warmup of the scale,
        # and what the schedule was built with (a resumed run rebuilds it identically).
        self._batch_change: dict[str, float] | None = None
        self._schedule_batch: int | None = None
        self._schedule_build: dict[str, float | None] | None = None

    @property
    def state_key(self) -> str:
        return callback_state_key(self, warmup=self.warmup, decay=self.decay,
                                        reference_batch_size=self.reference_batch_size)

    # ------------------------------------------------------------------ setup
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.lr_scheduler_configs:
            raise ValueError("LRSchedule sets the LR itself, but configure_optimizers also returned an lr_scheduler: "
                             "return only the optimizer, or drop LRSchedule and return lightning_lbo.schedules."
                             "lightning_scheduler(optimizer, schedule) from configure_optimizers.")
        if not trainer.optimizers:
            raise ValueError("LRSchedule found no optimizer: configure_optimizers must return one.")
        fresh = []
        for opt in trainer.optimizers:
            groups = getattr(opt, "param_groups", None)
            if not groups:
                raise ValueError(f"{type(opt).__name__} has no param_groups; LRSchedule needs a torch.optim.Optimizer "
                                 "whose param groups hold an 'lr'.")
            if any("lr" not in g for g in groups):
                raise ValueError(f"A param group of {type(opt).__name__} has no 'lr' key; give every group an LR.")
            fresh.append([float(g["lr"]) for g in groups])
        # The optimizer holds the LRs configure_optimizers gave it; a checkpoint's scheduled LRs are
        # restored into it only later (restore_training_state), so this is the moment to read them.
        self._fresh_base_lrs = fresh

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Resumed runs keep the base LRs of the original run.
        base = self._loaded_base_lrs if self._loaded_base_lrs is not None else self._fresh_base_lrs
        fresh = self._fresh_base_lrs
        if [len(b) for b in base] != [len(b) for b in fresh]:
            raise ValueError(f"The checkpoint's LRSchedule has {[len(b) for b in base]} param groups per optimizer, "
                             f"the configured optimizers have {[len(b) for b in fresh]}: resume with the same "
                             "optimizers.")
        self.base_lrs, self._loaded_base_lrs = base, None
        self._per_device_batch = self._read_batch_size(trainer)
        self._update_scale(trainer)
        if self._loaded_batch_size not in (None, self.global_batch_size):
            rank_zero_warn(f"LRSchedule: the global batch size changed from {self._loaded_batch_size} (checkpoint) to "
                           f"{self.global_batch_size}; the LR follows the new batch size.")
        self._loaded_batch_size = None
        if self._schedule_batch is None:
            self._schedule_batch = self.global_batch_size
        self.schedule, total = self._build_schedule(trainer)
        if self.custom_schedule is not None and math.isfinite(total) and total <= _CHECK_LIMIT:
            S.check_schedule(self.schedule, int(total))  # built-in schedules validate in their constructors
        # After restore_training_state: the optimizer holds the LRs of the last step taken.
        self._last_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        self._applied_step = None

    def _update_scale(self, trainer: Any) -> None:
        """Global batch and scaling factor for the current ``accumulate_grad_batches``."""
        self._accumulation = trainer.accumulate_grad_batches
        self.global_batch_size = self._per_device_batch * data_parallel_size(trainer) * self._accumulation
        if self.reference_batch_size is not None:
            ratio = self.global_batch_size / self.reference_batch_size
            self.scale = ratio if self.scaling == "linear" else math.sqrt(ratio)

    def _read_batch_size(self, trainer: Any) -> int:
        per_device = self.batch_size
        if per_device is None:
            loader = trainer.train_dataloader
            per_device = getattr(loader, "batch_size", None)
            if per_device is None:
                per_device = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
            if not _is_positive_int(per_device):
                raise ValueError("LRSchedule could not read the per-device batch size from the train DataLoader "
                                 f"({type(loader).__name__}): pass LRSchedule(batch_size=...).")
        return per_device

    def _steps_per_epoch(self, trainer: Any) -> int:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("The train DataLoader has no length, so epochs cannot be converted to steps: give "
                             "LRSchedule durations in steps (warmup_steps, milestone_steps, total_steps).")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def _build_schedule(self, trainer: Any) -> tuple[S.Schedule, float]:
        uses_epochs = (self.warmup_epochs or self.milestones or self.total_epochs is not None
                       or self.decay == "slow_start")
        spe = self._steps_per_epoch(trainer) if uses_epochs else None
        if self.total_steps is not None:
            total = float(self.total_steps)
        elif self.total_epochs is not None:
            total = self.total_epochs * spe
        else:
            total = float(trainer.estimated_stepping_batches)
        build_scale = self.scale
        if self._batch_change is not None and self._schedule_build is not None:  # resumed after a batch change
            spe, total, build_scale = (self._schedule_build[k] for k in ("steps_per_epoch", "total", "scale"))
        self._schedule_build = {"steps_per_epoch": spe, "total": total, "scale": build_scale}
        if self.custom_schedule is not None:
            return self.custom_schedule, total
        warmup = self._fit_warmup(trainer, self.warmup_epochs * spe if self.warmup_epochs
                                  else float(self.warmup_steps or 0), total)
        relative = True
        if self.decay == "constant":
            decay: S.Schedule = S.constant(1.0)
        elif self.decay in ("poly", "cosine"):
            if not math.isfinite(total):
                raise ValueError(f'decay="{self.decay}" needs the training length: set max_steps or max_epochs on the '
                                 "Trainer, or total_steps/total_epochs on LRSchedule.")
            decay = (S.poly(total - warmup, self.power, self.end_factor) if self.decay == "poly"
                     else S.cosine(total - warmup, self.end_factor))
        elif self.decay == "step":
            steps = self.milestone_steps or tuple(m * spe for m in self.milestones)
            decay, relative = S.step_decay(steps, self.gamma), False
        else:  # slow_start
            epochs = total / spe if self.scale_slow_start else S.AKIBA_EPOCHS
            if not math.isfinite(epochs):
                raise ValueError("scale_slow_start needs the training length: set max_epochs or total_epochs.")
            decay, relative = S.per_epoch(S.akiba_slow_start(epochs), spe), False
        if warmup == 0:
            return decay, total
        start = self.warmup_start_factor
        if start is None:
            start = min(1.0, 1.0 / build_scale)
        return S.warmup_then(decay, warmup, start, kind=self.warmup, relative=relative), total

    def _fit_warmup(self, trainer: Any, warmup: float, total: float) -> float:
        """The warmup length of this run: as configured, or half the run in a run cut short for a smoke test.

        A warmup fits if it ends within training and, before a ``poly``/``cosine`` decay, leaves at
        least one step to decay over. When it does not fit because the Trainer cut an epochs-based
        run short (``fast_dev_run``, or ``max_steps`` below ``max_epochs``), the warmup shrinks to
        ``floor(total / 2)`` steps, with a warning; otherwise the configuration is wrong: an error.
        """
        decays_after = self.decay in ("poly", "cosine")
        if warmup < total or (warmup == total and not decays_after):
            return warmup
        cut_short = self._cut_short_by(trainer, total)
        if cut_short is None:
            if warmup > total:
                raise ValueError(f"The warmup ({warmup:g} steps) is longer than training ({total:g} steps): shorten "
                                 "warmup_epochs/warmup_steps or train longer (max_epochs, max_steps, total_steps).")
            raise ValueError(f"No steps are left for the {self.decay} decay after a warmup of {warmup:g} of "
                             f"{total:g} steps: shorten the warmup or train longer.")
        shortened = float(math.floor(total / 2))
        instead = f"warms up over {shortened:g} steps instead" if shortened else "skips the warmup"
        rank_zero_warn(f"LRSchedule: {cut_short} leaves {total:g} optimizer steps, too few for the {warmup:g}-step "
                       f"warmup{f' and a {self.decay} decay' if decays_after else ''}; this run {instead} (a full "
                       "run keeps the configured schedule).")
        return shortened

    def _cut_short_by(self, trainer: Any, total: float) -> str | None:
        """``"fast_dev_run"`` or ``"max_steps=N"`` when the Trainer cut an epochs-based run to ``total`` steps."""
        if self.total_steps is not None or self.total_epochs is not None:
            return None  # the length was configured on LRSchedule itself
        if trainer.fast_dev_run:
            return "fast_dev_run"
        max_epochs, batches = trainer.max_epochs, trainer.num_training_batches
        if (trainer.max_steps not in (None, -1) and total == trainer.max_steps and max_epochs not in (None, -1)
                and math.isfinite(batches) and trainer.max_steps < max_epochs * self._steps_per_epoch(trainer)):
            return f"max_steps={trainer.max_steps} (below max_epochs={max_epochs})"
        return None

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._applied_step:  # later micro-batches of an accumulation window
            return
        self._applied_step = step
        if trainer.accumulate_grad_batches != self._accumulation:  # GradientAccumulationScheduler, AdaptiveBatchSize
            self._update_scale(trainer)
        multiplier = self.schedule(self._clock(step))
        scale = self._scale_at(step)
        if not (isinstance(multiplier, numbers.Real) and math.isfinite(multiplier) and multiplier >= 0):
            raise ValueError(f"The LR schedule gives the multiplier {multiplier!r} at step {step}; a learning rate "
                             "must stay finite and >= 0: fix the schedule.")
        many = len(trainer.optimizers) > 1
        for j, opt in enumerate(trainer.optimizers):
            for i, group in enumerate(opt.param_groups):
                new = self.base_lrs[j][i] * scale * multiplier
                old = self._last_lrs[j][i]
                if self.momentum_correction:
                    scale_momentum_(opt, correction_factor(old, new, lr_in_buffer=True), group)
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(new)
                else:
                    group["lr"] = new
                self._last_lrs[j][i] = new
                if self.log_lr:
                    name = group.get("name") or f"pg{i}"
                    # a tensor filled on the device: a Python float would be copied host-to-device every step
                    value = torch.full((), new, device=pl_module.device)
                    pl_module.log(f"lr/opt{j}/{name}" if many else f"lr/{name}", value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ batch changes
    def global_batch_changed(self, trainer: Any, per_device_batch_size: int | None = None,
                             rewarmup_steps: int = 0) -> None:
        """Entry point for callbacks that change the global batch during training (``AdaptiveBatchSize``).

        Call it after changing ``accumulate_grad_batches`` or the per-device batch (pass the new
        ``per_device_batch_size``), before the next optimizer step. From that step on:

        * the scaling factor ``k`` follows the new global batch (linear or sqrt rule), reached by a
          linear ramp over ``rewarmup_steps`` steps from the factor in use (Goyal's gradual warmup
          applied to the change; 0 = at once);
        * the schedule's clock counts progress in examples, in steps of the global batch it was built
          for, so warmup, milestones and decays keep their place in epochs;
        * with ``momentum_correction`` the buffers follow every LR change, as always.
        """
        if self.schedule is None:
            raise RuntimeError("LRSchedule.global_batch_changed was called before training started.")
        if per_device_batch_size is not None and not _is_positive_int(per_device_batch_size):
            raise ValueError(f"Invalid per_device_batch_size: {per_device_batch_size!r}; use a positive integer.")
        if not (isinstance(rewarmup_steps, numbers.Integral) and rewarmup_steps >= 0):
            raise ValueError(f"Invalid rewarmup_steps: {rewarmup_steps!r}; use an integer >= 0.")
        step = trainer.global_step
        from_scale, clock = self._scale_at(step), self._clock(step)
        if per_device_batch_size is not None:
            self._per_device_batch = int(per_device_batch_size)
        self._update_scale(trainer)
        self._batch_change = {"step": step, "clock": clock, "rate": self.global_batch_size / self._schedule_batch,
                              "from_scale": from_scale, "rewarmup_steps": int(rewarmup_steps)}

    def _clock(self, step: int) -> float:
        """The schedule's position at optimizer step ``step``: steps of the batch it was built for."""
        change = self._batch_change
        return step if change is None else change["clock"] + (step - change["step"]) * change["rate"]

    def _scale_at(self, step: int) -> float:
        """The scaling factor at ``step``, ramping after a batch change."""
        change = self._batch_change
        if change is None or step - change["step"] >= change["rewarmup_steps"]:
            return self.scale
        return change["from_scale"] + (step - change["step"]) / change["rewarmup_steps"] * (self.scale -
                                                                                           change["from_scale"])

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs, "scale": self.scale, "global_batch_size": self.global_batch_size,
                "batch_change": self._batch_change, "schedule_batch_size": self._schedule_batch,
                "schedule_build": self._schedule_build}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_base_lrs = state_dict.get("base_lrs")
        self._loaded_batch_size = state_dict.get("global_batch_size")
        self._batch_change = state_dict.get("batch_change")
        self._schedule_batch = state_dict.get("schedule_batch_size")
        self._schedule_build = state_dict.get("schedule_build")
