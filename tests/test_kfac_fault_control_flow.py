"""K-FAC under rank-dependent control flow (issue 26.1): statistics are matched by layer, never by position.

Two gloo ranks, plain torch DDP with ``find_unused_parameters=True`` and K-FAC with a communicator:
(a) two same-shaped branches, rank 0 runs one and rank 1 the other; (b) a layer that runs on rank 0 only.
Plain DDP + SGD keeps the ranks' weights equal in both; so must K-FAC (bit for bit), without an abort.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_lbo.optim.kfac import KFAC
from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator, default_communicator
from tests.helpers.ddp import spawn_gloo


class _Routed(nn.Module):
    """A trunk, two same-shaped branches chosen by ``route``, an optional extra layer, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 5)
        self.branch_a = nn.Linear(5, 5)
        self.branch_b = nn.Linear(5, 5)
        self.extra = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.route = "a"
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        h = torch.tanh(self.branch_a(h) if self.route == "a" else self.branch_b(h))
        if self.use_extra:
            h = torch.tanh(self.extra(h))
        return self.head(h)


def _make_comm(kind: str):
    if kind == "sync":
        return default_communicator()
    return TorchDistributedCommunicator(group=dist.new_group(backend="gloo"), async_op=True, reduce_in_hooks=False)


def _train_routed(rank: int, world_size: int, scenario: str, comm_kind: str) -> None:
    torch.manual_seed(0)
    model = _Routed()
    if scenario == "branches":
        model.route = "a" if rank == 0 else "b"
    else:  # only rank 0 runs `extra`
        model.use_extra = rank == 0
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, factor_update_interval=1, inverse_update_interval=1,
               kl_clip=None)
    opt.preconditioner.set_communicator(_make_comm(comm_kind))
    g = torch.Generator().manual_seed(10 + rank)  # every rank its own data
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert torch.isfinite(flat).all()
    assert torch.equal(gathered[0], gathered[1]), (scenario, comm_kind, (gathered[0] - gathered[1]).abs().max())
    # layers every rank ran are preconditioned with agreed factors: the trunk has a real (non-identity) A
    a_trunk = opt.preconditioner.factors(model.trunk)["A"]
    assert not torch.equal(a_trunk, torch.eye(a_trunk.shape[-1], dtype=a_trunk.dtype))
    opt.preconditioner.comm.wait()


@pytest.mark.parametrize("scenario", ["branches", "one_rank_layer"])
@pytest.mark.parametrize("comm_kind", ["sync", "async_step_time"])
def test_kfac_rank_dependent_control_flow_keeps_ranks_identical(scenario, comm_kind):
    spawn_gloo(_train_routed, world_size=2, args=(scenario, comm_kind))


def _hooks_mismatch(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = _Routed()
    model.route = "a" if rank == 0 else "b"
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = KFAC(model, lr=0.1, damping=1e-2, factor_update_interval=1, inverse_update_interval=1, kl_clip=None)
    # reductions launched from the hooks assume the same layers run on every rank: a mismatch is refused
    opt.preconditioner.set_communicator(TorchDistributedCommunicator(group=dist.new_group(backend="gloo"),
                                                                     async_op=True, reduce_in_hooks=True))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(ddp(x), y).backward()
    with pytest.raises(RuntimeError, match="branch_a.*reduce_in_hooks=False"):
        opt.step()


def test_kfac_rank_dependent_control_flow_refused_with_hook_reductions():
    spawn_gloo(_hooks_mismatch, world_size=2)


def _strategy_communicators(rank: int, world_size: int) -> None:
    import warnings
    from unittest import mock

    from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

    strategy_class = kfac_ddp_strategy_class("lightning.pytorch")
    for kwargs, in_hooks in (({}, True), ({"find_unused_parameters": True}, False),
                             ({"async_factors": False}, False)):
        strategy = strategy_class(**kwargs)
        with mock.patch.object(strategy_class, "optimizers", []), \
                mock.patch.object(strategy_class, "lightning_module", None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "found no K-FAC optimizer" (rank 0 only): none is needed here
                strategy.setup_curvature_sync()
        assert strategy.communicator.reduce_in_hooks is in_hooks, kwargs


def test_kfac_ddp_strategy_reduces_at_step_time_with_find_unused_parameters():
    spawn_gloo(_strategy_communicators, world_size=2)
