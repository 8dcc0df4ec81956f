"""Helpers for sharded-parameter tests (``fully_shard``, FSDP2) on CPU with gloo: a model, its batches, comparisons.

The oracle of every sharded test: P ranks, each with ``1/P`` of a global batch and ``fully_shard``-ed
parameters, equal one plain process on the whole global batch (float64). The model has odd sizes so
that shards are uneven (7 rows on 2 ranks: 4 + 3) and some are empty (a 3-row bias on 4 ranks), and a
LayerNorm (vector parameters next to matrices). The second part holds the Lightning setup of the scripts that
train it under ``ModelParallelStrategy`` (Lightning imported only there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


# ---- Lightning: the setup shared by tests/scripts/sharded_optim_lightning.py and kfac_sharded_lightning.py --------
def model_parallel_trainer(world_size: int, directory: str | None = None, callbacks: list | None = None,
                           nodes: int = 1, **kwargs):
    """A ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1))`` on CPU
    ranks (``world_size / nodes`` per node), quiet, with no sampler (each rank's split is explicit in its data) and
    no automatic checkpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = kwargs.pop("strategy", None) or ModelParallelStrategy(data_parallel_size=world_size,
                                                                     tensor_parallel_size=1)
    return pl.Trainer(accelerator="cpu", devices=world_size // nodes, num_nodes=nodes, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False,
                      default_root_dir=directory, callbacks=callbacks or [], strategy=strategy, **kwargs)


@functools.cache
def _sharded_net_class() -> type:
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class ShardedNet(pl.LightningModule):
        """:func:`make_mlp` as a LightningModule: ``fully_shard`` in ``configure_model`` (every Linear, then the
        net), the optimizer from ``optimizer(self)``, this rank's share of each global batch in order, and the
        whole parameters gathered into ``final`` when training ends."""

        def __init__(self, optimizer: Callable[[Any], Any], world_size: int, n_batches: int) -> None:
            super().__init__()
            self.optimizer_factory = optimizer
            self.world_size = world_size
            self.n_batches = n_batches
            self.net = make_mlp()
            self.final: list[torch.Tensor] = []

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return self.optimizer_factory(self)

        def train_dataloader(self) -> DataLoader:
            shares = [rank_batch(step, self.global_rank, self.world_size) for step in range(self.n_batches)]
            x, y = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
            return DataLoader(TensorDataset(x, y), batch_size=shares[0][0].shape[0])

        def on_train_end(self) -> None:
            self.final = [full(p.detach()) for p in self.net.parameters()]  # a collective on every rank

    return ShardedNet


def sharded_net(optimizer: Callable[[Any], Any], world_size: int, n_batches: int):
    """A new ``ShardedNet`` (see :func:`_sharded_net_class`); ``optimizer(module)`` builds its optimizer."""
    return _sharded_net_class()(optimizer, world_size, n_batches)


def one_process_run(optimizer: Callable[[nn.Module], torch.optim.Optimizer], steps: list[int],
                    world_size: int) -> nn.Module:
    """The oracle: a plain :func:`make_mlp` trained in this process on the global batch of each of ``steps``."""
    import torch.nn.functional as F

    model = make_mlp()
    opt = optimizer(model)
    for step in steps:
        x, y = global_batch(step, world_size)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def check_equals_one_process(module: Any, reference: nn.Module, what: str, rtol: float = 1e-6) -> float:
    """The whole parameters a sharded fit gathered (``module.final``) equal ``reference``'s; returns the worst
    relative error. Also checks that training moved the weights (else the comparison would prove nothing)."""
    assert len(module.final) == len(list(reference.parameters())), f"{what}: parameters missing"
    worst = 0.0
    for got, want in zip(module.final, reference.parameters(), strict=True):
        assert_close_relative(got, want.detach(), rtol, what)
        worst = max(worst, (torch.linalg.vector_norm(got - want.detach()) / torch.linalg.vector_norm(want)).item())
    moved = max((torch.linalg.vector_norm(w - w0) / torch.linalg.vector_norm(w0)).item()
                for w, w0 in zip(reference.parameters(), make_mlp().parameters(), strict=True))
    assert moved > 1e-3, f"{what}: the weights barely moved ({moved:.1e}); the comparison would prove nothing"
    return worst
