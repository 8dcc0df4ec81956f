"""K-FAC's factors of every preconditioned layer, read through the public accessor, for the GPU checks."""

from __future__ import annotations

from typing import Any

import torch


def layer_factors(optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {statistic ("A", "G" or "F"): factor}}`` of a ``KFAC`` optimizer or a ``KFACPreconditioner``."""
    pre = getattr(optimizer, "preconditioner", optimizer)
    return {block.name: pre.factors(block.name) for block in pre.blocks}
