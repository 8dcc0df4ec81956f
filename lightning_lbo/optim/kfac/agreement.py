"""Ranks agree on what they captured before reducing it (rank-dependent control flow: routing, LayerDrop).

With ``find_unused_parameters=True`` ranks may run different layers on a step. Statistics reduced
positionally, in hook order, would then mix layers (or abort with a size mismatch). On every refresh step
the ranks compare, per (block, statistic), how many sums each captured (one small collective):

* step-time reduction (``comm.reduce_in_hooks`` false): a block captured on some ranks only is skipped on
  every rank this step (retried at its next due step), the others are reduced by block, in block order;
* hook-time reduction: the sums were already averaged in hook order, so any difference raises, naming the
  layers and the fix.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac.comm import Communicator


def agree_on_captures(blocks: list[Any], captured: dict[int, Any], comm: Communicator, warn: bool
                      ) -> tuple[dict[int, Any], bool]:
    """The captures every rank commits, and whether a partial-capture warning was given (``warn``: may warn).

    One ``all_min`` of ``[counts, -counts]`` (per block and statistic, the minimum and maximum over ranks of the
    number of captured sums); a host sync on refresh steps only.
    """
    keys = [(block, stat) for block in blocks for stat in block.stat_names]
    counts = [len(captured[id(b)].sums.get(stat, ())) if id(b) in captured else 0 for b, stat in keys]
    flags = torch.tensor(counts + [-c for c in counts], dtype=torch.float32, device=blocks[0].weight.device)
    agreed = comm.all_min(flags).tolist()
    low, high = agreed[:len(keys)], [-v for v in agreed[len(keys):]]
    if comm.reduce_in_hooks:
        differ = list(dict.fromkeys(b.name for (b, _), lo, hi in zip(keys, low, high, strict=True) if lo != hi))
        if differ:
            raise RuntimeError(
                f"K-FAC: layers {differ} captured statistics a different number of times on different ranks "
                "(rank-dependent control flow), but this communicator reduces them from the hooks, in hook "
                "order, so they were mixed. Use a communicator with reduce_in_hooks=False (KFACDDPStrategy "
                "does with find_unused_parameters=True), or run the same layers on every rank.")
        return captured, False
    partial = list(dict.fromkeys(b for (b, _), lo, hi in zip(keys, low, high, strict=True) if lo == 0 and hi > 0))
    if not partial:
        return captured, False
    if warn:
        warnings.warn(f"K-FAC: layers {[b.name for b in partial]} ran on some ranks only on a refresh step "
                      "(rank-dependent control flow); their statistics are skipped on every rank and refreshed "
                      "at the next step where every rank runs them.", RuntimeWarning, stacklevel=5)
    kept = {key: record for key, record in captured.items() if all(key != id(b) for b in partial)}
    return kept, warn


def reduce_by_block(news: list[tuple[Any, str, fac.Factor]], comm: Communicator) -> None:
    """Average the new factors over ranks at step time, in ``news`` order (the same on every rank after
    :func:`agree_on_captures`), one call per symmetry so a synchronous communicator sends full buckets."""
    for symmetric in (True, False):
        same = [t for block, stat, new in news if bool(block.symmetric(stat)) is symmetric for t in new.wire()]
        if same:
            comm.reduce_factors(same, symmetric=symmetric)
    comm.wait()
