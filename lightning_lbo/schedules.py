"""Learning-rate schedules for large-batch training: pure ``step -> multiplier`` functions.

A schedule maps the optimizer step ``t`` (0-based count of optimizer steps already taken, a float is
allowed) to a multiplier of the target learning rate; the step with index ``t`` runs at
``lr = target_lr * schedule(t)``. Schedules of the fractional epoch ``e = t / steps_per_epoch`` are
turned into schedules of steps by :func:`per_epoch`. Each schedule is a small frozen dataclass with
``__call__``: pure, printable and picklable (``ddp_spawn`` pickles callbacks that hold one).

Papers (formulas in REFERENCE.md):

* Goyal et al. 2017 (arXiv 1706.02677): gradual warmup from ``lr`` to ``k * lr`` over 5 epochs with a
  constant increment per iteration, i.e. :func:`linear_warmup` with ``start_factor = 1/k``;
  constant warmup (:func:`constant_warmup`); LR / 10 at epochs 30, 60, 80 (:func:`step_decay`).
* You et al. 2017 (LARS, arXiv 1708.03888), MLPerf: warmup then ``(1 - t/T)^2`` (:func:`poly`).
* Akiba et al. 2017 (arXiv 1711.04325): slow-start multipliers 0.5 / 0.075 / 0.01 / 0.001 over
  epochs 0-39 / 40-69 / 70-84 / 85-89 (:func:`akiba_slow_start`).

Composition follows optax: :func:`join` runs ``schedules[i](t - boundaries[i-1])`` between
boundaries; :func:`warmup_then` is warmup joined with a decay. :func:`lambda_lr` adapts any schedule
to ``torch.optim.lr_scheduler.LambdaLR`` and :func:`lightning_scheduler` wraps it in the dict
Lightning expects, with ``interval="step"`` so it never steps per epoch by accident.

Example::

    sched = warmup_then(poly(steps=900, power=2.0), warmup_steps=100, start_factor=1 / 32)
    sched(0), sched(100), sched(1000)  # (0.03125, 1.0, 0.0)
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Schedule", "constant", "linear_warmup", "constant_warmup", "exponential_warmup", "poly", "cosine",
    "step_decay", "piecewise_constant", "akiba_slow_start", "join", "multiply", "per_epoch", "warmup_then",
    "check_schedule", "lambda_lr", "lightning_scheduler", "AKIBA_BOUNDARIES", "AKIBA_MULTIPLIERS",
]

#: Any ``step -> multiplier`` callable; the built-in ones are the dataclasses below.
Schedule = Callable[[float], float]

#: Akiba et al. 2017, table of the slow-start schedule for a 90-epoch run.
AKIBA_EPOCHS = 90
AKIBA_BOUNDARIES = (40.0, 70.0, 85.0)
AKIBA_MULTIPLIERS = (0.5, 0.075, 0.01, 0.001)


def _finite_nonneg(name: str, value: float, hint: str = "use a finite value >= 0") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}; {hint}.")
    return float(value)


def _positive(name: str, value: float) -> float:
    _finite_nonneg(name, value, "use a finite value > 0")
    if value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; use a finite value > 0.")
    return float(value)


@dataclass(frozen=True)
class Constant:
    """``value`` at every step."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _finite_nonneg("value", self.value)

    def __call__(self, step: float) -> float:
        return self.value


@dataclass(frozen=True)
class LinearWarmup:
    """``start + (end - start) * t / steps`` for ``t < steps``, then ``end`` (Goyal's gradual warmup)."""

    steps: float
    start_factor: float
    end_factor: float = 1.0

    def __post_init__(self) -> None:
        _finite_nonneg("warmup steps", self.steps)
        _finite_nonneg("start_factor", self.start_factor, "use a value >= 0 (0 = MLPerf-style warmup from zero)")
        _finite_nonneg("end_factor", self.end_factor)

    def __call__(self, step: float) -> float:
        if step >= self.steps or self.steps == 0:
            return self.end_factor
        return self.start_factor + (self.end_factor - self.start_factor) * max(step, 0.0) / self.steps


@dataclass(frozen=True)
class ConstantWarmup:
    """``factor`` for ``t < steps``, then 1 (Goyal's constant warmup)."""

    steps: float
    factor: float

    def __post_init__(self) -> None:
        _finite_nonneg("warmup steps", self.steps)
        _finite_nonneg("factor", self.factor)

    def __call__(self, step: float) -> float:
        return self.factor if step < self.steps else 1.0


@dataclass(frozen=True)
class ExponentialWarmup:
    """``start * (1 / start) ** (t / steps)`` for ``t < steps``, then 1: a constant ratio per step."""

    steps: float
    start_factor: float

    def __post_init__(self) -> None:
        _finite_nonneg("warmup steps", self.steps)
        if not (isinstance(self.start_factor, numbers.Real) and 0 < self.start_factor <= 1):
            raise ValueError(f"Invalid start_factor: {self.start_factor!r}; exponential warmup needs 0 < start_factor"
                             " <= 1 (use linear_warmup to start from 0).")

    def __call__(self, step: float) -> float:
        if step >= self.steps or self.steps == 0:
            return 1.0
        return self.start_factor ** (1.0 - max(step, 0.0) / self.steps)


@dataclass(frozen=True)
class Poly:
    """``end + (1 - end) * (1 - t / steps) ** power`` for ``t <= steps``, then ``end`` (LARS, MLPerf)."""

    steps: float
    power: float = 2.0
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        _positive("decay steps", self.steps)
        _positive("power", self.power)
        _finite_nonneg("end_factor", self.end_factor, "use a value >= 0 (the LR must not become negative)")

    def __call__(self, step: float) -> float:
        frac = min(max(step, 0.0), self.steps) / self.steps
        return self.end_factor + (1.0 - self.end_factor) * (1.0 - frac) ** self.power


@dataclass(frozen=True)
class Cosine:
    """``end + (1 - end) * (1 + cos(pi * t / steps)) / 2`` for ``t <= steps``, then ``end``."""

    steps: float
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        _positive("decay steps", self.steps)
        _finite_nonneg("end_factor", self.end_factor, "use a value >= 0 (the LR must not become negative)")

    def __call__(self, step: float) -> float:
        frac = min(max(step, 0.0), self.steps) / self.steps
        return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class PiecewiseConstant:
    """``values[i]`` for ``boundaries[i-1] <= t < boundaries[i]`` (``len(values) == len(boundaries) + 1``)."""

    boundaries: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(f"Invalid piecewise schedule: {len(self.boundaries)} boundaries need "
                             f"{len(self.boundaries) + 1} values, got {len(self.values)}.")
        for b in self.boundaries:
            _finite_nonneg("boundary", b)
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"Invalid boundaries: {self.boundaries}; give them in increasing order.")
        for v in self.values:
            _finite_nonneg("value", v, "the LR must stay finite and >= 0")

    def __call__(self, step: float) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]


@dataclass(frozen=True)
class Join:
    """optax's ``join_schedules``: ``schedules[i](t - boundaries[i-1])`` on ``[boundaries[i-1], boundaries[i])``."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(f"Invalid join: {len(self.boundaries)} boundaries need {len(self.boundaries) + 1} "
                             f"schedules, got {len(self.schedules)}.")
        if not all(callable(s) for s in self.schedules):
            raise TypeError("Invalid join: every schedule must be a callable step -> multiplier.")
        for b in self.boundaries:
            _finite_nonneg("boundary", b)
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"Invalid boundaries: {self.boundaries}; give them in increasing order.")

    def __call__(self, step: float) -> float:
        i = bisect.bisect_right(self.boundaries, step)
        return self.schedules[i](step - (self.boundaries[i - 1] if i else 0.0))


@dataclass(frozen=True)
class Multiply:
    """The product of several schedules at the same step (e.g. a warmup ramp times an absolute step decay)."""

    schedules: tuple[Schedule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", tuple(self.schedules))
        if not self.schedules or not all(callable(s) for s in self.schedules):
            raise TypeError("Invalid multiply: give one or more callables step -> multiplier.")

    def __call__(self, step: float) -> float:
        return math.prod(s(step) for s in self.schedules)


@dataclass(frozen=True)
class PerEpoch:
    """A schedule of the fractional epoch ``t / steps_per_epoch`` seen as a schedule of steps."""

    schedule: Schedule
    steps_per_epoch: float

    def __post_init__(self) -> None:
        _positive("steps_per_epoch", self.steps_per_epoch)
        if not callable(self.schedule):
            raise TypeError("Invalid schedule: give a callable epoch -> multiplier.")

    def __call__(self, step: float) -> float:
        return self.schedule(step / self.steps_per_epoch)


def constant(value: float = 1.0) -> Constant:
    """The multiplier ``value`` at every step."""
    return Constant(value)


def linear_warmup(steps: float, start_factor: float, end_factor: float = 1.0) -> LinearWarmup:
    """Linear ramp from ``start_factor`` (step 0) to ``end_factor`` (step ``steps`` and later).

    Goyal et al.: ``start_factor = 1/k`` when the LR was scaled by ``k``; MLPerf: ``start_factor = 0``.
    ``steps = 0`` is no warmup; ``steps = 1`` runs step 0 at ``start_factor`` and step 1 at ``end_factor``.
    """
    return LinearWarmup(steps, start_factor, end_factor)


def constant_warmup(steps: float, factor: float) -> ConstantWarmup:
    """``factor`` for the first ``steps`` steps, then 1 (Goyal et al. found an error spike at its end)."""
    return ConstantWarmup(steps, factor)


def exponential_warmup(steps: float, start_factor: float) -> ExponentialWarmup:
    """Geometric ramp from ``start_factor`` to 1 over ``steps`` steps (``start_factor > 0``)."""
    return ExponentialWarmup(steps, start_factor)


def poly(steps: float, power: float = 2.0, end_factor: float = 0.0) -> Poly:
    """Polynomial decay from 1 to ``end_factor`` over ``steps`` steps (LARS: ``power=2``; Osawa: 3.5)."""
    return Poly(steps, power, end_factor)


def cosine(steps: float, end_factor: float = 0.0) -> Cosine:
    """Half-cosine decay from 1 to ``end_factor`` over ``steps`` steps."""
    return Cosine(steps, end_factor)


def piecewise_constant(boundaries: Sequence[float], values: Sequence[float]) -> PiecewiseConstant:
    """``values[i]`` between ``boundaries[i-1]`` (included) and ``boundaries[i]`` (excluded)."""
    return PiecewiseConstant(tuple(boundaries), tuple(values))


def step_decay(milestones: Sequence[float], gamma: float = 0.1) -> PiecewiseConstant:
    """``gamma ** (number of milestones <= t)``: Goyal et al. divide by 10 at epochs 30, 60 and 80."""
    _finite_nonneg("gamma", gamma)
    return PiecewiseConstant(tuple(milestones), tuple(gamma**i for i in range(len(milestones) + 1)))


def akiba_slow_start(epochs: float = AKIBA_EPOCHS) -> PiecewiseConstant:
    """Akiba et al.'s slow-start multipliers as a schedule of the *fractional epoch*.

    0.5 / 0.075 / 0.01 / 0.001 over epochs [0, 40) / [40, 70) / [70, 85) / [85, 90) of the paper's
    90-epoch run; with ``epochs != 90`` the boundaries are scaled to the run's length
    (``boundary * epochs / 90``). Wrap in :func:`per_epoch` to get a schedule of steps.
    """
    scale = _positive("epochs", epochs) / AKIBA_EPOCHS
    return PiecewiseConstant(tuple(b * scale for b in AKIBA_BOUNDARIES), AKIBA_MULTIPLIERS)


def join(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Join:
    """optax-style join: each schedule counts steps from its own start boundary."""
    return Join(tuple(schedules), tuple(boundaries))


def multiply(*schedules: Schedule) -> Multiply:
    """Pointwise product of schedules."""
    return Multiply(schedules)


def per_epoch(schedule: Schedule, steps_per_epoch: float) -> PerEpoch:
    """Turn a schedule of the fractional epoch into a schedule of optimizer steps."""
    return PerEpoch(schedule, steps_per_epoch)


def warmup_then(decay: Schedule, warmup_steps: float, start_factor: float, kind: str = "linear",
                relative: bool = True) -> Schedule:
    """Warmup over ``warmup_steps`` steps, then ``decay``.

    Args:
        decay: the schedule after warmup.
        warmup_steps: length of the warmup (0: no warmup).
        start_factor: multiplier at step 0 (linear/exponential) or during warmup (constant).
        kind: ``"linear"`` (Goyal's gradual warmup), ``"constant"`` or ``"exponential"``.
        relative: ``True``: ``decay`` counts steps from the end of warmup (poly, cosine; optax's
            join). ``False``: ``decay`` counts steps from 0 (step milestones, Akiba's epochs) and the
            warmup ramp multiplies it, so the warmup ends at ``decay(warmup_steps)``.
    """
    ramps = {"linear": LinearWarmup, "constant": ConstantWarmup, "exponential": ExponentialWarmup}
    if kind not in ramps:
        raise ValueError(f"Invalid warmup kind: {kind!r}. Supported: {tuple(ramps)}.")
    ramp = ramps[kind](warmup_steps, start_factor)
    if relative:
        return Join((ramp, decay), (warmup_steps,))
    return Multiply((ramp, decay))


def check_schedule(schedule: Schedule, total_steps: int) -> None:
    """Raise if ``schedule`` gives a negative or non-finite multiplier at any step in ``[0, total_steps]``."""
    for step in range(int(total_steps) + 1):
        value = schedule(step)
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"The LR schedule {schedule!r} gives the multiplier {value!r} at step {step}; a "
                             "learning rate must stay finite and >= 0: fix the schedule (e.g. end_factor >= 0).")


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1
              ) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` running ``schedule``: call ``scheduler.step()`` after every optimizer step.

    Each param group's LR becomes ``initial_lr * schedule(t)`` for optimizer step ``t``.
    """
    if not getattr(optimizer, "param_groups", None):
        raise ValueError(f"{type(optimizer).__name__} has no param_groups; pass a torch.optim.Optimizer.")
    if not callable(schedule):
        raise TypeError(f"Invalid schedule: {schedule!r}; give a callable step -> multiplier.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=last_epoch)


def lightning_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> dict[str, Any]:
    """``configure_optimizers`` return value with ``schedule`` stepped once per optimizer step.

    Example::

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=3.2, momentum=0.9)
            return lightning_scheduler(opt, warmup_then(poly(9000), 500, start_factor=1 / 32))
    """
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": lambda_lr(optimizer, schedule), "interval": "step", "frequency": 1}}
