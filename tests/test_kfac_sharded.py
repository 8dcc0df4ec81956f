"""K-FAC on sharded parameters (``fully_shard`` / FSDP2, DTensor), exact mode: P ranks == 1 process.

Oracle (tests/helpers/kfac_sharded.py): P gloo ranks with ``fully_shard``-ed parameters and 1/P of each
global batch train like one plain process on the whole global batch (float64, <= 1e-6 relative) over 6
steps with factor refreshes at steps 0, 2, 4 and inversions at 0 and 3, a KL clip, L2, weight rescaling and
momentum; every rank holds bit-identical factors. The skip contract: a NaN on one rank changes nothing on
any rank and is counted on every rank.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import kfac_sharded as ks
from tests.helpers.ddp import spawn_gloo

STEPS = 6


def _kfac(model, comm=None):
    from lightning_lbo import KFAC

    opt = KFAC(model, **ks.KFAC_SETTINGS)
    if comm is not None:
        opt.preconditioner.set_communicator(comm)
    return opt


def _equal_to_one_process(rank: int, world_size: int, model_name: str, inject: bool = True) -> None:
    """``inject=False``: nothing injected, K-FAC builds its communicator on the parameters' mesh at bind."""
    import torch.distributed as dist

    from lightning_lbo.optim.kfac.comm import Communicator
    from lightning_lbo.optim.kfac.distributed import default_communicator

    reference = ks.MODELS[model_name]()
    ref_opt = _kfac(reference, Communicator())  # one process: the no-op communicator, injected on purpose
    model = ks.shard(ks.MODELS[model_name](), world_size)
    opt = _kfac(model, default_communicator() if inject else None)
    assert any(hasattr(p, "full_tensor") for p in model.parameters())  # really sharded
    if not inject:
        assert opt.preconditioner.comm.is_distributed and opt.preconditioner.comm.world_size == world_size
    kinds = {type(b).__name__ for b in opt.preconditioner.blocks}
    if model_name == "gpt":  # the blocks whose parameters are not (only) their own weight and bias
        assert {"MultiheadAttentionBlock", "TiedEmbeddingBlock"} <= kinds, kinds
    worst = 0.0
    for step in range(STEPS):
        ks.reference_step(reference, ref_opt, model_name, step, world_size)
        ks.sharded_step(model, opt, model_name, step, rank, world_size)
        worst = max(worst, ks.assert_equal_to_reference(model, reference, f"rank {rank}, step {step}"))
    # momentum buffers equal the reference's, and stay sharded like their parameters (checkpoints reshard them)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        assert type(buf) is type(p)
        assert ks.relative_error(ks.full(buf), ref_buf) <= 1e-6
    # factors: equal to the reference and bit-identical on every rank
    assert [b.name for b in opt.preconditioner.blocks] == [b.name for b in ref_opt.preconditioner.blocks]
    for block, ref_block in zip(opt.preconditioner.blocks, ref_opt.preconditioner.blocks, strict=True):
        assert block.refreshes == ref_block.refreshes and sum(block.refreshes.values()) >= 2 * len(block.stat_names)
        for stat, factor in block.factors.items():
            assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-6, (block.name, stat)
            gathered = [torch.empty_like(factor) for _ in range(world_size)]
            dist.all_gather(gathered, factor.contiguous())
            assert all(torch.equal(g, gathered[0]) for g in gathered), (block.name, stat)
    assert opt.preconditioner.steps == STEPS
    # the communicator reports the whole-gradient gathers: every preconditioned weight and bias, every step
    whole = sum(p.numel() * p.element_size() for b in opt.preconditioner.blocks for p in b.params)
    assert opt.preconditioner.comm.stats.shard_gather_bytes == STEPS * whole
    print(f"rank {rank} {model_name} P={world_size}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kfac_sharded_equals_one_process(model_name):
    spawn_gloo(_equal_to_one_process, world_size=2, args=(model_name,))


@pytest.mark.slow
def test_kfac_sharded_equals_one_process_four_ranks():
    spawn_gloo(_equal_to_one_process, world_size=4, args=("mlp",))


def _mesh_communicator(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    _equal_to_one_process(rank, world_size, "mlp", inject=False)
    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model)
    assert opt.preconditioner.comm.group is dist.group.WORLD  # the mesh's group: no new group was created
    # what only KFACCallback provides still fails loudly, naming it: float16 output gradients without a grad scaler
    opt.preconditioner.capture.output_grad_dtypes.add(torch.float16)
    with pytest.raises(RuntimeError, match="no AMP grad scaler.*KFACCallback"):
        ks.sharded_step(model, opt, "mlp", 0, rank, world_size)


def test_kfac_sharded_builds_its_communicator_on_the_mesh():
    """Nothing injected (no KFACCallback, no set_communicator): the parameters' mesh gives the curvature group
    (before: the first step raised, naming KFACCallback); a missing AMP grad scaler still raises, naming it."""
    spawn_gloo(_mesh_communicator, world_size=2)


@pytest.mark.slow  # about 22 s on 2 busy cores
def test_kfac_sharded_gpt_equals_one_process():
    """The GPT of lightning_lbo.lm: nn.MultiheadAttention (in_proj_weight, out_proj) and tied embeddings."""
    spawn_gloo(_equal_to_one_process, world_size=2, args=("gpt", False))


@pytest.mark.slow
def test_kfac_sharded_gpt_equals_one_process_four_ranks():
    spawn_gloo(_equal_to_one_process, world_size=4, args=("gpt", False))


def _snapshot(model, opt):
    params = [ks.full(p.detach()).clone() for p in model.parameters()]
    bufs = [ks.full(opt.state[p]["momentum_buffer"]).clone() for p in model.parameters()
            if "momentum_buffer" in opt.state[p]]
    factors = [f.clone() for b in opt.preconditioner.blocks for f in b.factors.values()]
    return params + bufs + factors


def _skip_contract(rank: int, world_size: int) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator())
    for step in range(2):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    before = _snapshot(model, opt)
    ks.sharded_step(model, opt, "mlp", 2, rank, world_size, poison=rank == 1)  # a refresh step, NaN on rank 1 only
    after = _snapshot(model, opt)
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), f"rank {rank}: state changed"
    assert int(opt.nonfinite_skips) == 1
    ks.sharded_step(model, opt, "mlp", 3, rank, world_size)
    assert all(torch.isfinite(ks.full(p.detach())).all() for p in model.parameters())


def test_kfac_sharded_nonfinite_batch_on_one_rank_changes_nothing():
    spawn_gloo(_skip_contract, world_size=2)


def _refuses_unsupported_placement(rank: int, world_size: int) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    mesh = init_device_mesh("cpu", (world_size,))
    layer = model[0]
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(1)]))
    with pytest.raises(ValueError, match="sharded on dim 0 over a 1-D mesh"):
        _kfac(model)


def test_kfac_sharded_refuses_column_sharded_weight():
    spawn_gloo(_refuses_unsupported_placement, world_size=2)


def _refuses_fsdp1(rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(ks.make_mlp(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"FSDP1 parameters .* Shard with fully_shard \(FSDP2"):
            _kfac(model)


def test_kfac_refuses_fsdp1_parameters():
    """FSDP1 (what Lightning's FSDPStrategy wraps with; on CPU through torch directly): refused at bind, naming
    fully_shard (before: use_orig_params=False said "no layer K-FAC supports ... use a first-order optimizer", which
    refuse FSDP1 too; use_orig_params=True bound to the flattened pieces)."""
    spawn_gloo(_refuses_fsdp1, world_size=2)
