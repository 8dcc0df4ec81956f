"""When to grow the batch: the rules of :class:`~lightning_lbo.callbacks.AdaptiveBatchSize`, pure Python.

A rule sees one :class:`Observation` per decision (each epoch end, or each interval of steps or
samples the callback was given) and answers with the batch *factor* (a positive
integer multiple of the base batch) the next epoch should use. Rules only decide; the callback
measures what a rule needs (:attr:`BatchSizeRule.needs`), caps the factor, makes every rank agree
and hands the decision to a mechanism (gradient accumulation or a resized batch sampler).

* :class:`HessianRule` (ABS; Yao, Gholami, Keutzer, Mahoney 2018): double when the top Hessian
  eigenvalue fell to ``eigenvalue_ratio`` of its value at the last increase, or after ``duration``
  decisions without one (epochs when the callback decides at epoch ends, as in the paper).
* :class:`NoiseScaleRule` (after McCandlish et al. 2018): double while the measured simple noise
  scale ``B_simple`` exceeds ``margin`` times the current global batch. ``B_simple`` is the batch
  size up to which a larger batch still cuts steps almost proportionally; the margin keeps the batch
  below it, where doubling it costs little in examples.
* :class:`RampRule`: an explicit schedule ``{epoch: factor}`` (batch-size warmup).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Observation:
    """What a rule sees at the end of an epoch.

    Attributes:
        epoch: the epoch that just ended (0-based).
        factor: the batch factor it trained with.
        global_batch: the global batch it trained with (base global batch x factor).
        eigenvalue: top Hessian eigenvalue (only for rules that need ``"eigenvalue"``).
        b_simple: simple gradient noise scale (only for rules that need ``"b_simple"``).
    """

    epoch: int
    factor: int
    global_batch: int
    eigenvalue: float | None = None
    b_simple: float | None = None


class BatchSizeRule:
    """Base class: ``decide(observation) -> factor for the next epoch``; state for checkpoints."""

    #: The measurement the rule needs each epoch: ``None``, ``"eigenvalue"`` or ``"b_simple"``.
    needs: str | None = None

    def decide(self, obs: Observation) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _check_growth(growth: Any) -> int:
    if not isinstance(growth, int) or isinstance(growth, bool) or growth < 2:
        raise ValueError(f"Invalid growth: {growth!r}; use an integer >= 2 (2 = doubling, as in ABS).")
    return growth


class HessianRule(BatchSizeRule):
    """ABS: grow when the top Hessian eigenvalue dropped to ``eigenvalue_ratio`` of the reference.

    The reference is the eigenvalue at the last increase (the first measurement to begin with); it is
    reset to the current value on every increase, as in the paper.

    Args:
        eigenvalue_ratio: grow when ``lambda <= eigenvalue_ratio * lambda_ref`` (paper: 0.5).
        duration: grow anyway after this many decisions without an increase. The paper decides once
            per epoch and uses 10 (of 90 epochs); a callback deciding every N steps or samples counts
            its decisions, so keep the paper's proportion with ``duration / decisions per run = 10 / 90``.
        growth: factor per increase (paper: 2).

    After each :meth:`decide`, :attr:`last_trigger` says why it grew: ``"eigenvalue"`` (the halving;
    also when the duration ran out at the same time), ``"duration"``, or ``None`` (no growth).
    """

    needs = "eigenvalue"

    def __init__(self, eigenvalue_ratio: float = 0.5, duration: int = 10, growth: int = 2) -> None:
        if not 0.0 < eigenvalue_ratio < 1.0:
            raise ValueError(f"Invalid eigenvalue_ratio: {eigenvalue_ratio}; use a value in (0, 1) (paper: 0.5).")
        if not isinstance(duration, int) or isinstance(duration, bool) or duration < 1:
            raise ValueError(f"Invalid duration: {duration!r}; use a positive integer (paper: 10).")
        self.eigenvalue_ratio, self.duration, self.growth = eigenvalue_ratio, duration, _check_growth(growth)
        self.reference: float | None = None
        self.decisions_since_increase = 0
        self.last_trigger: str | None = None

    def decide(self, obs: Observation) -> int:
        self.last_trigger = None
        if obs.eigenvalue is None or not math.isfinite(obs.eigenvalue):
            return obs.factor  # no usable measurement: keep the batch
        self.decisions_since_increase += 1
        if self.reference is None:
            self.reference = obs.eigenvalue
            return obs.factor
        if obs.eigenvalue <= self.eigenvalue_ratio * self.reference:
            self.last_trigger = "eigenvalue"
        elif self.decisions_since_increase >= self.duration:
            self.last_trigger = "duration"
        else:
            return obs.factor
        self.reference, self.decisions_since_increase = obs.eigenvalue, 0
        return obs.factor * self.growth

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "decisions_since_increase": self.decisions_since_increase}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference = state.get("reference")
        # "epochs_since_increase": checkpoints from when decisions were only taken at epoch ends
        self.decisions_since_increase = int(state.get("decisions_since_increase",
                                                      state.get("epochs_since_increase", 0)))


class NoiseScaleRule(BatchSizeRule):
    """Grow while the simple noise scale exceeds the current global batch by ``margin``.

    Args:
        margin: grow when ``B_simple >= margin * global_batch``; 1 follows ``B_simple`` itself, larger
            values stay further below it (fewer examples wasted per step).
        growth: factor per increase; the callback applies at most one increase per epoch.
    """

    needs = "b_simple"

    def __init__(self, margin: float = 1.0, growth: int = 2) -> None:
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
            raise ValueError(f"Invalid margin: {margin!r}; use a positive number (1 = grow up to B_simple).")
        self.margin, self.growth = float(margin), _check_growth(growth)

    def decide(self, obs: Observation) -> int:
        if obs.b_simple is None or not math.isfinite(obs.b_simple):
            return obs.factor
        return obs.factor * self.growth if obs.b_simple >= self.margin * obs.global_batch else obs.factor


class RampRule(BatchSizeRule):
    """An explicit batch-size schedule: ``{epoch: factor}``, each factor holding from its epoch on.

    Args:
        factors: epoch -> factor of the base batch (``{0: 1, 2: 2, 4: 4}``); epoch 0 must be 1, the
            base batch the run starts with, and factors must not decrease.
    """

    def __init__(self, factors: Mapping[int, int]) -> None:
        items = sorted(dict(factors).items())
        if not items or items[0] != (0, 1):
            raise ValueError(f"Invalid factors: {dict(factors)!r}; start with {{0: 1}} (the base batch at epoch 0).")
        for (_, f0), (e1, f1) in zip(items, items[1:], strict=False):
            if not (isinstance(e1, int) and isinstance(f1, int) and f1 >= f0 >= 1):
                raise ValueError(f"Invalid factors: {dict(factors)!r}; use integer epochs and integer factors that "
                                 "never decrease.")
        self.factors = items

    def factor_at(self, epoch: int) -> int:
        """The factor in force during ``epoch``."""
        return max(f for e, f in self.factors if e <= epoch)

    def decide(self, obs: Observation) -> int:
        return self.factor_at(obs.epoch + 1)


RULES = {"hessian": HessianRule, "noise_scale": NoiseScaleRule}


def make_rule(rule: BatchSizeRule | str) -> BatchSizeRule:
    """A rule object from a rule or the name of one with default arguments (``"hessian"``, ``"noise_scale"``)."""
    if isinstance(rule, BatchSizeRule):
        return rule
    if rule in RULES:
        return RULES[rule]()
    raise ValueError(f"Invalid rule: {rule!r}. Supported: {tuple(RULES)} or a BatchSizeRule (RampRule({{0: 1, ...}})).")
