"""Helpers for sharded-parameter tests (``fully_shard``, FSDP2) on CPU with gloo: a model, its batches, comparisons.

The oracle of every sharded test: P ranks, each with ``1/P`` of a global batch and ``fully_shard``-ed
parameters, equal one plain process on the whole global batch (float64). The model has odd sizes so
that shards are uneven (7 rows on 2 ranks: 4 + 3) and some are empty (a 3-row bias on 4 ranks), and a
LayerNorm (vector parameters next to matrices).
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES, N_CLASSES, PER_RANK_BATCH = 6, 3, 4


def make_mlp() -> nn.Module:
    """Linear -> LayerNorm -> Tanh -> Linear -> Tanh -> Linear, float64, the same weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, N_CLASSES)).double()


def shard(model: nn.Module, world_size: int) -> nn.Module:
    """``fully_shard`` every Linear, then the root, on a 1-D mesh of ``world_size`` CPU ranks (as a user would)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``PER_RANK_BATCH * world_size`` samples, the same for every world size
    that divides it when ``world_size`` is the largest one used (we draw for 4 ranks and slice)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(PER_RANK_BATCH * 4, IN_FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (PER_RANK_BATCH * 4,), generator=gen)
    return x, y


def rank_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous share of the global batch of ``step``."""
    x, y = global_batch(step, world_size)
    size = x.shape[0] // world_size
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective: call on every rank), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """``||got - expected|| <= rtol * ||expected||`` (a relative error of the whole tensor)."""
    err = torch.linalg.vector_norm(got - expected).item()
    scale = torch.linalg.vector_norm(expected).item()
    assert err <= rtol * max(scale, 1e-300), f"{what}: relative error {err / max(scale, 1e-300):.3e} > {rtol}"
