"""TorchDistributedCommunicator: bucketed packed all-reduce, LPT assignment, broadcast, decisions (gloo)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.distributed import (
    TorchDistributedCommunicator,
    greedy_assignment,
    pack_symmetric,
    unpack_symmetric_,
)
from tests.helpers.ddp import spawn_gloo


def _rank_factors(rank: int) -> list[torch.Tensor]:
    """Per-rank symmetric factors of several sizes (different on each rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for n in (1, 3, 17, 40):
        x = torch.randn(n + 5, n, generator=g)
        out.append(x.T @ x / (n + 5))
    x = torch.randn(6, 3, 2, generator=g)
    out.append(x.transpose(1, 2) @ x)  # a batch of 2x2 blocks (unit-wise BatchNorm Fisher)
    return out


def _check_collectives(rank: int, world_size: int) -> None:
    # Expected averages from every rank's inputs, recomputed locally (an independent path: no collective).
    expected = [sum(fs) / world_size for fs in zip(*[_rank_factors(r) for r in range(world_size)], strict=True)]
    rect = torch.full((4, 6), float(rank))
    for cap_mb, async_op, pack in [(0.0, True, True), (0.002, True, True), (25.0, True, False), (0.002, False, True)]:
        comm = TorchDistributedCommunicator(bucket_cap_mb=cap_mb, async_op=async_op, pack_symmetric=pack)
        factors = _rank_factors(rank)
        rect_t = rect.clone()
        comm.reduce_factors(factors[:2], symmetric=True)
        comm.reduce_factors([rect_t], symmetric=False)
        comm.reduce_factors(factors[2:], symmetric=True)
        comm.wait()
        for got, want in zip(factors, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert torch.equal(got, got.transpose(-1, -2))
        torch.testing.assert_close(rect_t, torch.full((4, 6), (world_size - 1) / 2))
        dense = sum(f.numel() * 4 for f in factors) + 24 * 4
        packed = sum(f.numel() // f.shape[-1] ** 2 * f.shape[-1] * (f.shape[-1] + 1) // 2 * 4 for f in factors) + 24 * 4
        assert comm.stats.factor_dense_bytes == dense
        assert comm.stats.factor_bytes == (packed if pack else dense)
        if cap_mb == 0.0:
            assert comm.stats.factor_reductions == 6  # one per factor
        if cap_mb == 25.0:
            assert comm.stats.factor_reductions == 1  # everything in one bucket

    comm = TorchDistributedCommunicator()
    # broadcast: rank 1's values everywhere, several tensors in one buffer
    ts = [torch.full((3, 3), float(rank)), torch.full((5,), 10.0 + rank)]
    comm.broadcast(ts, src=1)
    assert torch.equal(ts[0], torch.ones(3, 3)) and torch.equal(ts[1], torch.full((5,), 11.0))
    # all_min: the logical AND of flags, and the minimum of floats
    flags = torch.tensor([True, rank == 0, True])
    assert comm.all_min(flags).tolist() == [True, False, True]
    vals = torch.tensor([float(rank), -float(rank), 3.0])
    assert comm.all_min(vals).tolist() == [0.0, -(world_size - 1.0), 3.0]
    assert comm.assign([5.0, 1.0, 9.0, 3.0]) == greedy_assignment([5.0, 1.0, 9.0, 3.0], world_size)
    assert comm.stats.broadcast_bytes == (9 + 5) * 4 and comm.stats.decision_bytes == 3 + 12
    # symmetric tensors travel as packed triangles and come back symmetric on every rank, the source too
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(rank))
    sym = x @ x.transpose(1, 2)
    vec = torch.full((5,), float(rank))
    comm.broadcast([sym, vec], src=1, symmetric=[True, False])
    y = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))  # rank 1's matrices, recomputed
    want = y @ y.transpose(1, 2)
    torch.testing.assert_close(sym, want)
    assert torch.equal(sym, sym.transpose(1, 2)) and torch.equal(vec, torch.full((5,), 1.0))
    assert comm.stats.broadcast_bytes == (9 + 5) * 4 + (2 * 10 + 5) * 4
    assert comm.stats.broadcast_dense_bytes == (9 + 5) * 4 + (2 * 16 + 5) * 4

    # a dedicated process group (what the strategy injects) behaves the same
    group = dist.new_group(backend="gloo")
    comm = TorchDistributedCommunicator(group=group, grad_worker_fraction=1 / world_size)
    assert comm.owners_precondition
    factors = _rank_factors(rank)
    comm.reduce_factors(factors, symmetric=True)
    comm.wait()
    torch.testing.assert_close(factors[-1], expected[-1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        TorchDistributedCommunicator(grad_worker_fraction=0.0)


def test_communicator_collectives_match_plain_average():
    """Bucketed, packed, async and sync reductions, broadcast and all_min agree with local references."""
    spawn_gloo(_check_collectives, world_size=2)


def test_pack_unpack_symmetric_roundtrip():
    """The packed triangle holds n(n+1)/2 numbers and restores the symmetric matrix exactly."""
    x = torch.randn(7, 5)
    m = x.T @ x
    packed = pack_symmetric(m)
    assert packed.numel() == 15
    out = unpack_symmetric_(torch.zeros(5, 5), packed)
    assert torch.equal(out, m.triu() + m.triu(1).T)
    blocks = torch.randn(4, 2, 2)
    blocks = blocks + blocks.transpose(1, 2)
    packed = pack_symmetric(blocks)
    assert packed.tolist() == blocks[:, [0, 0, 1], [0, 1, 1]].flatten().tolist()
    assert torch.equal(unpack_symmetric_(torch.zeros(4, 2, 2), packed), blocks)


def _brute_force_makespan(costs: list[float], world_size: int) -> float:
    return min(max(sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size))
               for owners in itertools.product(range(world_size), repeat=len(costs)))


def test_greedy_assignment_lpt():
    """LPT: largest first to the least loaded rank, deterministic ties, within 4/3 of the optimal makespan."""
    assert greedy_assignment([8.0, 1.0, 4.0, 4.0], 2) == [0, 0, 1, 1]
    assert greedy_assignment([2.0, 2.0, 2.0], 2) == [0, 1, 0]  # ties: lower index, then lower rank
    assert greedy_assignment([3.0, 1.0], 1) == [0, 0]
    g = torch.Generator().manual_seed(0)
    for world_size in (2, 3):
        costs = (torch.randint(1, 30, (7,), generator=g) ** 3).double().tolist()
        owners = greedy_assignment(costs, world_size)
        makespan = max(sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size))
        assert makespan <= 4 / 3 * _brute_force_makespan(costs, world_size) + 1e-9
    with pytest.raises(ValueError, match="Invalid costs"):
        greedy_assignment([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="Invalid world_size"):
        greedy_assignment([1.0], 0)


def test_communicator_needs_process_group():
    """Building the torch.distributed communicator without init_process_group says what to do."""
    assert not Communicator().is_distributed
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributedCommunicator()


def _check_low_precision_reduce(rank: int, world_size: int) -> None:
    expected = [sum(fs) / world_size for fs in zip(*[_rank_factors(r) for r in range(world_size)], strict=True)]
    comm = TorchDistributedCommunicator(reduce_dtype=torch.bfloat16)
    factors = _rank_factors(rank)
    comm.reduce_factors(factors, symmetric=True)
    comm.wait()
    for got, want in zip(factors, expected, strict=True):
        # each rank's entries are rounded to bf16 (relative 2^-9) before an fp32 sum
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=2 ** -8 * want.abs().max().item())
        assert not torch.equal(got, want) or got.numel() == 1
    packed = sum(f.numel() // f.shape[-1] ** 2 * f.shape[-1] * (f.shape[-1] + 1) // 2 for f in factors)
    assert comm.stats.factor_bytes == packed * 2  # half the fp32 payload
    gathered = [torch.empty_like(factors[-1]) for _ in range(world_size)]
    dist.all_gather(gathered, factors[-1])
    assert all(torch.equal(g, gathered[0]) for g in gathered)  # every rank holds the same bits
    with pytest.raises(ValueError, match="reduce_dtype"):
        TorchDistributedCommunicator(reduce_dtype=torch.int8)


def test_communicator_bf16_reduce_accumulates_in_fp32():
    """reduce_dtype=bfloat16: half the factor bytes, averages within bf16 rounding, identical on all ranks."""
    spawn_gloo(_check_low_precision_reduce, world_size=2)
