"""The first-estimate retry: a statistic with no finite estimate yet is refreshed again at the next step.

Before its first finite estimate a statistic is the identity placeholder, so its layer gets plain SGD. When its
first refresh is skipped (a bad first batch, a step the optimizer skips), waiting one whole
``factor_update_interval`` would keep it there; instead it is refreshed at the next step and its layer is
re-inverted as soon as it has an estimate (its inverse was built from the placeholder).

One host sync per refresh step, only until every statistic has had its first finite estimate: the host
remembers which have (after a checkpoint load it asks once more).
"""

from __future__ import annotations

from typing import Any

import torch


class FirstEstimates:
    """Which (block, statistic) the host knows to be estimated, and which were found without an estimate."""

    def __init__(self) -> None:
        self._known: set[tuple[int, str]] = set()
        self._unestimated: set[tuple[int, str]] = set()

    def retry(self, news: list[tuple[Any, str, Any]], step: int) -> None:
        """After the refresh of ``news`` at ``step``: reschedule the statistics still unestimated to ``step + 1``;
        a block whose statistic has just had its first estimate after a skipped one is re-inverted."""
        pending = [(block, stat) for block, stat, _ in news if (id(block), stat) not in self._known]
        if not pending:
            return
        flags = torch.stack([block.estimated[stat] for block, stat in pending]).tolist()
        for (block, stat), estimated in zip(pending, flags, strict=True):
            key = (id(block), stat)
            if estimated:
                self._known.add(key)
                if key in self._unestimated:  # its inverse was built from the placeholder: rebuild it now
                    self._unestimated.discard(key)
                    block.invalidate_inverse()
            else:
                self._unestimated.add(key)
                block.retry(stat, step)

    def reset(self, blocks: list[Any]) -> None:
        """After a checkpoint load: ask again at the next refresh; a statistic still on its placeholder is
        re-inverted when first estimated, as in the checkpointed run (one host read at load)."""
        self._known = set()
        self._unestimated = {(id(block), stat) for block in blocks for stat, flag in block.estimated.items()
                             if stat in block.stored and not bool(flag)}
