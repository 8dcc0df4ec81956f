"""What the K-FAC GPU checks share: a small model with one layer of each block kind, its batches, the training
loop, and every layer's factors read through the public accessor."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def layer_factors(optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {statistic ("A", "G" or "F"): factor}}`` of a ``KFAC`` optimizer or a ``KFACPreconditioner``."""
    pre = getattr(optimizer, "preconditioner", optimizer)
    return {block.name: pre.factors(block.name) for block in pre.blocks}


def kfac_net() -> nn.Module:
    """Conv2d, BatchNorm2d (unit-wise block) and Linear: one layer of each K-FAC block kind."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def kfac_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed CPU batches of 8 images (3x6x6) and labels in 0..4."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


def train_steps(model: nn.Module, opt: Any, batches, device: torch.device, autocast: bool = False) -> None:
    """One optimizer step per batch on ``device`` (optionally under bf16 autocast)."""
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
