"""Read access to the optimizer state the GPU checks compare: K-FAC's factors, skip counters.

Issue 13 adds a public read accessor for each layer's factors (``preconditioner.factors(layer)``). This
module is the only code of tests/gpu and benchmarks/gpu_check*.py that reads factors: it uses the
accessor where it exists and, on a tree from before it, the preconditioner's per-layer state.
"""

from __future__ import annotations

from typing import Any

import torch


def layer_factors(optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {statistic name ("A", "G", "F"): factor}}`` of a ``KFAC`` optimizer (or a preconditioner)."""
    pre = getattr(optimizer, "preconditioner", optimizer)
    if callable(getattr(pre, "factors", None)):  # the public accessor (issue 13)
        return {block.name: pre.factors(block.name) for block in pre.blocks}
    return {st.block.name: dict(st.factors) for st in pre.states}  # before it


def skip_count(optimizer: Any) -> torch.Tensor:
    """An optimizer's count of updates skipped for non-finite gradients (a 0-d device tensor, no host sync).

    Issue 14 makes ``nonfinite_skips`` (a property; a method before) the counter of every optimizer of the
    package; ``KFAC.skipped_steps`` is the older name.
    """
    counter = getattr(optimizer, "nonfinite_skips", None)
    if counter is None:
        counter = optimizer.skipped_steps
    return counter() if callable(counter) else counter
