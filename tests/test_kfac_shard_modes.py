"""K-FAC's placement modes on sharded parameters (``shard_placement=``; :mod:`lightning_lbo.optim.kfac.shard_modes`).

Owner mode (exact, memory-saving): P gloo ranks with ``fully_shard``-ed parameters equal one plain process on the
global batch (float64, <= 1e-6 relative, 6 steps with refreshes at 0, 2, 4 and inversions at 0, 3, KL clip, momentum,
weight rescaling), each rank holds only the blocks it owns (read from the tensors: <= 1/P + 10% of the replicate
mode's curvature bytes), the communicator counts the gathers and scatters exactly, the skip contract holds, and
checkpoints reshard (2 -> 1, 1 -> 2). Shard-local mode (an approximation): equal to the exact mode in one process,
its factors are the corresponding sub-blocks of the exact ones, no gradient is gathered, checkpoints resume.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tests.helpers import kfac_sharded as ks
from tests.helpers.ddp import spawn_gloo

STEPS, SAVED_AT = 6, 3
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _kfac(model, comm=None, mode="owner", **overrides):
    from lightning_lbo import KFAC

    opt = KFAC(model, shard_placement=mode, **{**ks.KFAC_SETTINGS, **overrides})
    if comm is not None:
        opt.preconditioner.set_communicator(comm)
    return opt


def _one_process(model_name="mlp", steps=STEPS, world_size=2, mode="replicate"):
    from lightning_lbo.optim.kfac.comm import Communicator

    model = ks.MODELS[model_name]()
    opt = _kfac(model, Communicator(), mode=mode)
    for step in range(steps):
        ks.reference_step(model, opt, model_name, step, world_size)
    return model, opt


def _padded_bytes(t: torch.Tensor, world: int) -> int:
    """Bytes of ``t`` split over ``world`` ranks in equal (padded) chunks of rows: one gather's or scatter's payload."""
    return world * -(-t.shape[0] // world) * math.prod(t.shape[1:]) * t.element_size()


# ----------------------------------------------------------------------------------------------- validation
def test_kfac_shard_placement_unknown_name_raises():
    with pytest.raises(ValueError, match=r"Invalid shard_placement: 'owners'; choose one of \('replicate', 'owner'"):
        _kfac(ks.make_mlp(), mode="owners")


def test_kfac_shard_placement_owner_refuses_stale_statistics():
    from lightning_lbo.optim.kfac import StaleStatistics

    with pytest.raises(ValueError, match="does not support stale_statistics"):
        _kfac(ks.make_mlp(), mode="owner", stale_statistics=StaleStatistics())


def test_kfac_shard_placement_is_part_of_the_signature():
    """Ranks built with different modes would deadlock in their first collective: the cross-rank check sees it."""
    owner = _kfac(ks.make_mlp(), mode="owner").preconditioner.signature()
    replicate = _kfac(ks.make_mlp(), mode="replicate").preconditioner.signature()
    assert owner["settings"]["shard_placement"] == "owner" and owner != replicate


# ----------------------------------------------------------------------------------------------- owner mode
def _owner_equals_one_process(rank: int, world_size: int, model_name: str) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator
    from lightning_lbo.optim.kfac.shard_modes import owners

    reference, ref_opt = _one_process(model_name, steps=0, world_size=world_size)
    model = ks.shard(ks.MODELS[model_name](), world_size)
    opt = _kfac(model, default_communicator(), mode="owner")
    pre = opt.preconditioner
    owner = owners(pre.blocks, world_size)
    assert set(owner) == set(range(world_size)) or len(pre.blocks) < world_size  # the work is spread
    worst = 0.0
    for step in range(STEPS):
        ks.reference_step(reference, ref_opt, model_name, step, world_size)
        ks.sharded_step(model, opt, model_name, step, rank, world_size)
        worst = max(worst, ks.assert_equal_to_reference(model, reference, f"rank {rank}, step {step}"))
        # bytes of the last step: one gather and one scatter of every preconditioned gradient (padded rows)
        whole = sum(_padded_bytes(p, world_size) for b in pre.blocks for p in b.params)
        moved = pre.placement.last_step_bytes
        assert moved["shard_gather_bytes"] == whole and moved["shard_scatter_bytes"] == whole, (step, moved, whole)
        assert moved["broadcast_bytes"] == 0  # no inverse travels
    for block, ref_block, block_owner in zip(pre.blocks, ref_opt.preconditioner.blocks, owner, strict=True):
        assert block.refreshes == ref_block.refreshes and sum(block.refreshes.values()) >= 2 * len(block.stat_names)
        if block_owner == rank:  # the owner holds the factors (equal to one process's) and the inverse
            assert block.inverse is not None
            for stat, factor in block.factors.items():
                assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-6, (block.name, stat)
            assert set(block.factors) == set(block.stat_names)
        else:  # every other rank holds nothing of it
            assert block.factors == {} and block.inverse is None and block.curvature_tensors() == []
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert ks.relative_error(ks.full(opt.state[p]["momentum_buffer"]), ref_opt.state[q]["momentum_buffer"]) <= 1e-6
    print(f"rank {rank} owner {model_name} P={world_size}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kfac_shard_modes_owner_equals_one_process_two_ranks(model_name):
    spawn_gloo(_owner_equals_one_process, world_size=2, args=(model_name,))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kfac_shard_modes_owner_equals_one_process_four_ranks(model_name):
    spawn_gloo(_owner_equals_one_process, world_size=4, args=(model_name,))


def _owner_refuses_attention(rank: int, world_size: int) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.MODELS["gpt"](), world_size)
    opt = _kfac(model, default_communicator(), mode="owner")
    before = [ks.full(p.detach()).clone() for p in model.parameters()]
    # every rank refuses at the first step, before any gather (no rank left waiting in a collective)
    with pytest.raises(ValueError, match=r"shard_placement='owner'.*MultiheadAttentionBlock.*'replicate'"):
        ks.sharded_step(model, opt, "gpt", 0, rank, world_size)
    assert all(torch.equal(ks.full(p.detach()), b) for p, b in zip(model.parameters(), before, strict=True))


def test_kfac_shard_modes_owner_refuses_blocks_with_other_parameters():
    """The owner mode gathers a block's weight and bias; attention (and any block reading other parameters)
    is refused with a message naming the replicate mode, on every rank alike: no obscure error, no hang."""
    spawn_gloo(_owner_refuses_attention, world_size=2)


def _owner_under_ddp(rank: int, world_size: int) -> None:
    """Replicated parameters (DDP): the owner preconditions its blocks and broadcasts P; the same run as one process."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from lightning_lbo.optim.kfac.distributed import default_communicator

    reference, ref_opt = _one_process("mlp", steps=0, world_size=world_size)
    model = ks.make_mlp()
    wrapped = DistributedDataParallel(model)
    opt = _kfac(model, default_communicator(), mode="owner")
    for step in range(STEPS):
        ks.reference_step(reference, ref_opt, "mlp", step, world_size)
        opt.zero_grad()
        x, y = ks.part(ks.global_batch("mlp", step), rank, world_size)
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert ks.relative_error(p.detach(), q.detach()) <= 1e-6, (rank, step)
    held = [bool(b.curvature_tensors()) for b in opt.preconditioner.blocks]
    assert 0 < sum(held) < len(held), held  # each rank holds its share only
    assert opt.preconditioner.placement.last_step_bytes["broadcast_bytes"] > 0  # P travels, no gradient gather
    assert opt.preconditioner.placement.last_step_bytes["shard_gather_bytes"] == 0


def test_kfac_shard_modes_owner_under_ddp_equals_one_process():
    spawn_gloo(_owner_under_ddp, world_size=2)


WIDTH, DEPTH = 16, 8


def _equal_blocks() -> nn.Module:
    """``DEPTH`` equal Linear blocks (curvature that divides evenly over 2 and 4 ranks), float64."""
    torch.manual_seed(0)
    hidden = [m for _ in range(DEPTH - 2) for m in (nn.Tanh(), nn.Linear(WIDTH, WIDTH))]
    layers = [nn.Linear(ks.IN_FEATURES, WIDTH), *hidden]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(WIDTH, ks.N_CLASSES)).double()


def _memory(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from lightning_lbo.optim.kfac.distributed import default_communicator
    from lightning_lbo.optim.kfac.shard_modes import curvature_bytes

    held, comm = {}, default_communicator()
    for mode in ("replicate", "owner"):
        model = ks.shard(_equal_blocks(), world_size)
        opt = _kfac(model, comm, mode=mode)
        for step in range(4):  # past a refresh after the last inversion: inverses built from older factors
            ks.sharded_step(model, opt, "mlp", step, rank, world_size)  # MLP-shaped batches
        held[mode] = curvature_bytes(opt.preconditioner)
        del model, opt  # no sharded model outlives its use (fewer live gloo buffers at teardown)
        gc.collect()
    ratio = held["owner"] / held["replicate"]
    ratios = [None] * world_size
    dist.all_gather_object(ratios, ratio)
    print(f"rank {rank} P={world_size}: curvature bytes owner {held['owner']} / replicate {held['replicate']} = "
          f"{ratio:.3f}")
    assert ratio <= 1 / world_size + 0.1, ratios
    assert sum(ratios) >= 0.999  # the blocks are all held somewhere: together the ranks hold all the curvature
    dist.barrier()


def test_kfac_shard_modes_owner_memory_per_rank_two_ranks():
    spawn_gloo(_memory, world_size=2)


@pytest.mark.slow
def test_kfac_shard_modes_owner_memory_per_rank_four_ranks():
    spawn_gloo(_memory, world_size=4)


def _snapshot(model, opt):
    params = [ks.full(p.detach()).clone() for p in model.parameters()]
    bufs = [ks.full(opt.state[p]["momentum_buffer"]).clone() for p in model.parameters()
            if "momentum_buffer" in opt.state[p]]
    curvature = [t.clone() for b in opt.preconditioner.blocks for t in b.curvature_tensors()]
    return params + bufs + curvature


def _owner_skip_contract(rank: int, world_size: int) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator(), mode="owner")
    for step in range(2):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    before = _snapshot(model, opt)
    ks.sharded_step(model, opt, "mlp", 2, rank, world_size, poison=rank == 1)  # a refresh step, NaN on rank 1 only
    after = _snapshot(model, opt)
    assert len(after) == len(before) and len(before) > len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), f"rank {rank}: state changed"
    assert int(opt.nonfinite_skips) == 1
    ks.sharded_step(model, opt, "mlp", 3, rank, world_size)
    assert all(torch.isfinite(ks.full(p.detach())).all() for p in model.parameters())


def test_kfac_shard_modes_owner_nonfinite_batch_on_one_rank_changes_nothing():
    spawn_gloo(_owner_skip_contract, world_size=2)


# ----------------------------------------------------------------------------------------------- owner checkpoints
def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def _assert_same_state(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want), f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key].cpu(), value.cpu()), key
        else:
            assert got[key] == value, key


def _save_owner(rank: int, world_size: int, path: str) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator(), mode="owner")
    for step in range(SAVED_AT):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    model_state = get_model_state_dict(model, options=FULL)
    optim_state = get_optimizer_state_dict(model, opt, options=FULL)  # collective: every block from its owner
    kfac_state = opt.preconditioner.state_dict()
    # the materialised state is the whole curvature, the same on every rank; afterwards each rank holds its share
    assert all(len(entry["factors"]) == len(b.stat_names) for entry, b in zip(kfac_state["blocks"],
                                                                                opt.preconditioner.blocks, strict=True))
    assert sum(1 for b in opt.preconditioner.blocks if b.factors) < len(opt.preconditioner.blocks)
    if rank == 0:
        torch.save({"model": model_state, "optim": optim_state, "kfac": kfac_state}, path)


def test_kfac_shard_modes_owner_checkpoint_two_ranks_resume_in_one_process(tmp_path):
    from lightning_lbo.optim.kfac.comm import Communicator

    path = str(tmp_path / "owner.pt")
    spawn_gloo(_save_owner, world_size=2, args=(path,))
    saved = torch.load(path, weights_only=False)
    assert set(saved["optim"]) == {"state", "param_groups"}
    _, at_save = _one_process(steps=SAVED_AT)
    for entry, ref_block in zip(saved["kfac"]["blocks"], at_save.preconditioner.blocks, strict=True):
        for stat, factor in entry["factors"].items():  # every block's factors, each from its owner
            assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-6, (entry["name"], stat)
    model = ks.make_mlp()
    set_model_state_dict(model, saved["model"])
    opt = _kfac(model, Communicator(), mode="owner")
    set_optimizer_state_dict(model, opt, saved["optim"])
    _assert_same_state(opt.preconditioner.state_dict(), saved["kfac"])
    for step in range(SAVED_AT, STEPS):
        ks.reference_step(model, opt, "mlp", step, 2)
    reference, _ = _one_process(steps=STEPS)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert ks.relative_error(p.detach(), q.detach()) <= 1e-6


def _resume_owner(rank: int, world_size: int, path: str) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator
    from lightning_lbo.optim.kfac.shard_modes import owners

    saved = torch.load(path, weights_only=False)
    model = ks.shard(ks.make_mlp(), world_size)
    set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
    opt = _kfac(model, default_communicator(), mode="owner")
    set_optimizer_state_dict(model, opt, saved["optim"], options=StateDictOptions(full_state_dict=True))
    pre = opt.preconditioner
    owner = owners(pre.blocks, world_size)
    held = [bool(b.curvature_tensors()) for b in pre.blocks]
    assert held == [o == rank for o in owner], (rank, held, owner)  # only the owned blocks are kept at load
    _assert_same_state(pre.state_dict(), saved["kfac"])  # collective: the whole state, bit for bit
    for step in range(SAVED_AT, STEPS):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    reference, _ = _one_process(steps=STEPS, world_size=world_size)
    ks.assert_equal_to_reference(model, reference, f"rank {rank}")


def test_kfac_shard_modes_owner_checkpoint_one_process_resume_at_two_ranks(tmp_path):
    model, opt = _one_process(steps=SAVED_AT)
    path = str(tmp_path / "plain.pt")
    torch.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                "kfac": opt.preconditioner.state_dict()}, path)
    spawn_gloo(_resume_owner, world_size=2, args=(path,))


# ----------------------------------------------------------------------------------------------- shard-local mode
def test_kfac_shard_modes_local_equals_exact_in_one_process():
    """At P = 1 each rank's rows are all rows: the shard-local code path (stacked diagonal blocks of G, local views,
    its own inversion and clip) gives the exact mode's run."""
    exact, exact_opt = _one_process(steps=STEPS, mode="replicate")
    local, local_opt = _one_process(steps=STEPS, mode="local")
    assert all(type(b).__name__.startswith("ShardLocal") for b in local_opt.preconditioner.blocks)
    for p, q in zip(local.parameters(), exact.parameters(), strict=True):
        assert ks.relative_error(p.detach(), q.detach()) <= 1e-12
    for block, ref_block in zip(local_opt.preconditioner.blocks, exact_opt.preconditioner.blocks, strict=True):
        for stat, factor in block.factors.items():
            assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-12, (block.name, stat)


def _local_factors_are_sub_blocks(rank: int, world_size: int) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    reference, ref_opt = _one_process(steps=1, world_size=world_size)  # the exact factors at the same weights
    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator(), mode="local")
    ks.sharded_step(model, opt, "mlp", 0, rank, world_size)
    pre = opt.preconditioner
    for block, ref_block in zip(pre.blocks, ref_opt.preconditioner.blocks, strict=True):
        start, stop = block.rows
        exact = ref_block.factors
        if "G" in exact:
            assert torch.allclose(block.factors["A"], exact["A"], rtol=1e-9, atol=1e-12), block.name
            assert torch.allclose(block.factors["G"], exact["G"][:, start:stop, start:stop], rtol=1e-9, atol=1e-12)
        else:
            assert torch.allclose(block.factors["F"], exact["F"][start:stop], rtol=1e-9, atol=1e-12), block.name
    assert pre.comm.stats.shard_gather_bytes == 0  # no gradient gathered
    # the G statistic on the wire is the stack of the P diagonal blocks: d_g^2 / P numbers, not d_g^2
    for step in range(1, STEPS):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
        assert all(torch.isfinite(ks.full(p.detach())).all() for p in model.parameters())


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_kfac_shard_modes_local_factors_are_sub_blocks_of_the_exact_ones(world_size):
    spawn_gloo(_local_factors_are_sub_blocks, world_size=world_size)


def _local_resume(rank: int, world_size: int) -> None:
    """Save a shard-local run at step 3 (get/set_optimizer_state_dict, full state dicts), resume it in a fresh
    model and optimizer: the state is restored bit for bit and 3 more steps equal the uninterrupted run."""
    from lightning_lbo.optim.kfac.distributed import default_communicator

    comm = default_communicator()
    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, comm, mode="local")
    for step in range(SAVED_AT):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    whole = StateDictOptions(full_state_dict=True)  # on every rank (no cpu_offload: that keeps it on rank 0 only)
    model_state = get_model_state_dict(model, options=whole)
    optim_state = get_optimizer_state_dict(model, opt, options=whole)
    kfac_state = opt.preconditioner.state_dict()
    g = kfac_state["blocks"][0]["factors"]["G"]  # the block-diagonal G of the ranks' G_rr
    start, stop = opt.preconditioner.blocks[0].rows
    assert g.shape[-1] == 7 and torch.equal(g[:, start:stop, start:stop], opt.preconditioner.blocks[0].factors["G"])
    fresh = ks.shard(ks.make_mlp(), world_size)
    set_model_state_dict(fresh, model_state, options=whole)
    fresh_opt = _kfac(fresh, comm, mode="local")
    set_optimizer_state_dict(fresh, fresh_opt, optim_state, options=whole)
    _assert_same_state(fresh_opt.preconditioner.state_dict(), kfac_state)
    for step in range(SAVED_AT, STEPS):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
        ks.sharded_step(fresh, fresh_opt, "mlp", step, rank, world_size)
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        error = ks.relative_error(ks.full(p.detach()), ks.full(q.detach()))
        assert error <= 1e-6, f"rank {rank}: relative error {error:.2e}"


def test_kfac_shard_modes_local_checkpoint_resumes_at_two_ranks():
    spawn_gloo(_local_resume, world_size=2)
