"""A refresh, the work the preconditioner schedules on a step where statistics or inverses are due.

:class:`StatisticsRefresh` commits a step's captured statistics, in order:

* ranks agree on what they captured (:func:`~.agreement.agree_on_captures`; several ranks, refresh steps only);
* :func:`new_factors`: the captured sums -> ``(block, statistic, new factor)`` in block order, the same on every
  rank whatever order the hooks ran in (each block's :meth:`~.blocks.CurvatureBlock.statistics` verb);
* :func:`commit_factors`: averaged over ranks when the hooks did not, the finite flags agreed on every rank (one
  ``all_min``, on the device), each block's ``commit`` verb (running average where finite, else the old factor);
* :func:`update_intervals`: each statistic's next refresh (stale statistics: one host read of the agreed
  "stable" flags per refresh step);
* the first-estimate retry (:class:`~.first_estimate.FirstEstimates`).

:func:`refresh_inverses` follows: the blocks whose inverse is due, assigned to ranks, inverted with the fallback
ladder by their owner, installed by each block's ``install`` verb and broadcast.

Functions of the blocks, the communicator and the settings (:class:`StatisticsRefresh` also remembers its
one-time warnings and the first estimates): the preconditioner owns the counters and decides when each runs.
Nothing here reads a block's private state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac import inversion
from lightning_lbo.optim.kfac.agreement import agree_on_captures, reduce_by_block
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.first_estimate import FirstEstimates
from lightning_lbo.optim.kfac.fisher import Fisher
from lightning_lbo.optim.kfac.settings import ScheduleSettings
from lightning_lbo.optim.kfac.stale import StaleStatistics

#: one refreshed statistic: the block, the statistic's name, its new factor (before the running average)
NewFactor = tuple[Any, str, fac.Factor]


def new_factors(blocks: list[Any], captured: dict[int, Any], due: dict[int, set[str]], per_example: bool
                ) -> tuple[list[NewFactor], list[str]]:
    """The new factors of the captured sums, and the blocks whose due output statistic was not captured."""
    news: list[NewFactor] = []
    missing = []
    for block in blocks:
        record = captured.get(id(block))
        if record is None:
            continue
        if block.output_stat in due[id(block)] and block.output_stat not in record.sums:
            missing.append(block.name)
        order = block.stat_names.index  # the same order on every rank, whatever order the hooks ran in
        news.extend((block, stat, new) for stat, new in sorted(
            block.statistics(record.sums, record.examples, per_example), key=lambda item: order(item[0])))
    return news, missing


def warn_missing(missing: list[str], reason: str | None) -> None:
    """Warn that ``missing`` layers got no output-gradient statistic (``reason``: the sampled-label Fisher's)."""
    fix = reason or "their outputs received no gradient; exclude them (exclude=[...]) if they do not reach the loss"
    warnings.warn(f"K-FAC captured no output-gradient statistic for {missing} on a refresh step: {fix}. "
                  "These layers keep their previous (initially identity) factor.", RuntimeWarning, stacklevel=4)


def commit_factors(news: list[NewFactor], keep: torch.Tensor | None, comm: Communicator, decay: float,
                   track_change: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Commit ``news`` on every rank alike: returns the agreed ``ok`` flags (bool, one per entry, on the device) and
    each block's relative change (``track_change``: for stale statistics; ``None`` without a previous factor)."""
    if comm.is_distributed and not comm.reduce_in_hooks:
        reduce_by_block(news, comm)  # every rank holds the same (block, statistic) list (agreed before)
    finite = torch.stack([new.finite() for _, _, new in news])
    if keep is not None:
        finite = finite & keep.to(finite.device)
    ok = comm.all_min(finite.float()) > 0
    changes = [block.commit(stat, new, ok[j], decay, track_change) for j, (block, stat, new) in enumerate(news)]
    return ok, changes


def update_intervals(news: list[NewFactor], ok: torch.Tensor, changes: list[torch.Tensor | None], base: int,
                     policy: StaleStatistics | None, comm: Communicator, step: int) -> None:
    """Reschedule each refreshed statistic: ``base`` steps on, or (stale statistics) its interval grown when its
    change was below the threshold on every rank, shrunk otherwise."""
    if policy is None:
        for block, stat, _ in news:
            block.reschedule(stat, base, step)
        return
    flags = [(change < policy.threshold) & ok[j] if change is not None else
             torch.zeros((), dtype=torch.bool, device=ok.device) for j, change in enumerate(changes)]
    stable = comm.all_min(torch.stack(flags).float()).tolist()  # one sync per refresh step
    for (block, stat, _), change, flag in zip(news, changes, stable, strict=True):
        interval = block.interval[stat]
        block.reschedule(stat, policy.next_interval(interval, flag > 0) if change is not None else interval, step)


class StatisticsRefresh:
    """The commit of a step's captured statistics, and what it remembers between steps: whether each one-time
    warning was given, and which statistics have had a first finite estimate (:class:`FirstEstimates`)."""

    def __init__(self) -> None:
        self.warned_missing = False
        self.warned_partial = False
        self.first_estimates = FirstEstimates()

    def commit(self, blocks: list[Any], capture: Any, due: dict[int, set[str]], keep: torch.Tensor | None, step: int,
               comm: Communicator, schedule: ScheduleSettings, fisher: Fisher) -> torch.Tensor | None:
        """Commit what ``capture`` collected for ``step`` (``due``: the statistics armed per block; ``keep``: False
        when the optimizer skips the step) and reschedule it. Returns how many statistics were skipped as not
        finite (a 0-d tensor on the device), ``None`` when nothing was refreshed."""
        comm.wait()
        captured = capture.collect()
        if comm.is_distributed and any(due.values()):  # a refresh step (the same on every rank)
            captured, warned = agree_on_captures(blocks, captured, comm, not self.warned_partial)
            self.warned_partial |= warned
        if not captured:
            return None
        news, missing = new_factors(blocks, captured, due, fisher is Fisher.EMPIRICAL)
        if missing and not self.warned_missing:
            self.warned_missing = True
            warn_missing(missing, capture.mc_missing_reason(missing) if fisher is Fisher.MC else None)
        if not news:
            return None
        policy = schedule.stale_statistics
        ok, changes = commit_factors(news, keep, comm, schedule.factor_decay, policy is not None)
        update_intervals(news, ok, changes, schedule.factor_interval(step), policy, comm, step)
        self.first_estimates.retry(news, step)
        return (~ok).sum()


def refresh_inverses(blocks: list[Any], due: bool, method: inv.InverseMethod, damping: float, comm: Communicator,
                     owners_only: bool) -> int:
    """Invert the blocks that need it (``due``: an inverse-update step; a block without an inverse needs one at
    once), each on the rank ``comm.assign`` gives it, and install the result everywhere: the inverse (broadcast
    by its owner), or nothing off the owner when ``owners_only`` (owners precondition). Returns how many fell back
    to the plain gradient."""
    todo = [block for block in blocks if block.needs_inverse(due)]
    if not todo:
        return 0
    distributed = comm.is_distributed
    jobs = [block.inverse_job(method, damping, allow_low_rank=not distributed) for block in todo]
    owners = comm.assign([block.cost() for block in todo])
    rank = comm.rank
    mine = [job for job, owner in zip(jobs, owners, strict=True) if owner == rank]
    computed: dict[int, inv.BlockInverse] = {}
    failed: list[str] = []
    if mine:
        inverses, failed = inversion.invert_with_fallback(mine)
        computed = {id(job.block): inverse for job, inverse in zip(mine, inverses, strict=True)}
    for job, owner in zip(jobs, owners, strict=True):
        if owner == rank:
            inverse = computed[id(job.block)]
        else:  # several ranks: a buffer to receive the owner's inverse, or none where owners precondition
            inverse = None if owners_only else job.method.receiver(fac.dense_factors(job.factors), job.dtype)
        job.block.install(job, owner, inverse)
        if distributed and not owners_only:
            comm.broadcast(inverse.tensors(), src=owner, symmetric=inverse.symmetric_flags())
    return len(failed)
