"""Stale statistics (SP-NGD, Osawa et al. 2020, arXiv 2002.06015): refresh a statistic only when it moves.

Each statistic (a layer's ``A``, ``G`` or unit-wise ``F``) keeps its own refresh interval. On a
refresh step the new estimate ``X_t`` is compared with the statistic in use ``X_prev``:

.. math:: r = \\frac{\\lVert X_t - X_{prev} \\rVert_F}{\\lVert X_{prev} \\rVert_F}

``r < threshold``: the statistic is stable and its interval grows (``ceil(interval * growth)``, up
to ``max_interval``); otherwise it shrinks (``floor(interval * shrink)``, at least ``min_interval``).
A statistic that is not due is neither computed nor communicated. The paper's exact growth rule
could not be re-checked; this policy exposes the rule's parameters instead of hard-coding one.
All ranks apply the same decision: the preconditioner reduces the "stable" flags with
``Communicator.all_min`` before calling :meth:`StaleStatistics.next_interval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StaleStatistics:
    """Interval policy for stale statistics.

    Args:
        threshold: relative change below which a statistic counts as stable.
        growth: interval multiplier when stable (> 1).
        shrink: interval multiplier when not stable (in (0, 1]).
        min_interval: smallest interval (steps).
        max_interval: largest interval (steps).

    Example::

        KFAC(model, stale_statistics=StaleStatistics(threshold=0.1, growth=2.0, max_interval=200))
    """

    threshold: float = 0.1
    growth: float = 2.0
    shrink: float = 0.5
    min_interval: int = 1
    max_interval: int = 100

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"Invalid threshold: {self.threshold}; use a positive relative change.")
        if not self.growth > 1:
            raise ValueError(f"Invalid growth: {self.growth}; use a factor > 1.")
        if not 0 < self.shrink <= 1:
            raise ValueError(f"Invalid shrink: {self.shrink}; use a factor in (0, 1].")
        if not 1 <= self.min_interval <= self.max_interval:
            raise ValueError(f"Invalid intervals: min_interval={self.min_interval}, max_interval={self.max_interval}; "
                             "use 1 <= min_interval <= max_interval.")

    @staticmethod
    def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``||new - old||_F / ||old||_F`` as a 0-dim tensor (inf when ``old`` is zero)."""
        return torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old)

    def next_interval(self, interval: int, stable: bool) -> int:
        """The interval after a refresh whose change was (not) below the threshold."""
        if stable:
            return min(self.max_interval, max(interval + 1, math.ceil(interval * self.growth)))
        return max(self.min_interval, math.floor(interval * self.shrink))
