"""K-FAC's curvature survives ``torch.distributed.checkpoint.state_dict`` (what Lightning's ModelParallelStrategy uses).

``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``; K-FAC therefore stores each layer's
curvature in the per-parameter state of its weight (``kfac.*`` entries) and its counters in the param groups.
Save at 2 sharded ranks, resume in 1 process, and the reverse: every curvature tensor and counter is restored
bit for bit, and 3 more steps equal 6 uninterrupted ones (float64, <= 1e-6 relative).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tests.helpers import kfac_sharded as ks
from tests.helpers.ddp import spawn_gloo

SAVED_AT, STEPS = 3, 6
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _kfac(model, comm):
    from lightning_lbo import KFAC

    opt = KFAC(model, **ks.KFAC_SETTINGS)
    if comm is not None:  # None: what K-FAC chose at bind (on sharded parameters, the mesh's group)
        opt.preconditioner.set_communicator(comm)
    return opt


def _flat(tree, prefix=""):
    """Every leaf of a nested dict/list, keyed by its path (to compare whole K-FAC states)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def assert_same_kfac_state(got, want):
    """The preconditioner states are equal entry for entry (tensors bit-identical); none is missing."""
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want), f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key].cpu(), value.cpu()), key
        else:
            assert got[key] == value, key


def _uninterrupted(steps: int, world_size: int):
    from lightning_lbo.optim.kfac.comm import Communicator

    model = ks.make_mlp()
    opt = _kfac(model, Communicator())
    for step in range(steps):
        ks.reference_step(model, opt, "mlp", step, world_size)
    return model, opt


def _save_sharded(rank: int, world_size: int, path: str) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator())
    for step in range(SAVED_AT):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    model_state = get_model_state_dict(model, options=FULL)
    optim_state = get_optimizer_state_dict(model, opt, options=FULL)
    if rank == 0:
        torch.save({"model": model_state, "optim": optim_state, "kfac": opt.preconditioner.state_dict(),
                    "skips": int(opt.nonfinite_skips)}, path)


def test_kfac_sharded_checkpoint_two_ranks_resume_in_one_process(tmp_path):
    from lightning_lbo.optim.kfac.comm import Communicator

    path = str(tmp_path / "sharded.pt")
    spawn_gloo(_save_sharded, world_size=2, args=(path,))
    saved = torch.load(path, weights_only=False)
    assert set(saved["optim"]) == {"state", "param_groups"}  # what the API keeps: the curvature must be in there
    model = ks.make_mlp()
    set_model_state_dict(model, saved["model"])
    opt = _kfac(model, Communicator())
    set_optimizer_state_dict(model, opt, saved["optim"])
    assert_same_kfac_state(opt.preconditioner.state_dict(), saved["kfac"])
    assert int(opt.nonfinite_skips) == saved["skips"]
    assert all("kfac_steps" not in g for g in opt.param_groups)  # counters do not become hyperparameters
    for step in range(SAVED_AT, STEPS):
        ks.reference_step(model, opt, "mlp", step, 2)
    reference, ref_opt = _uninterrupted(STEPS, 2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert ks.relative_error(p.detach(), q.detach()) <= 1e-6
    for block, ref_block in zip(opt.preconditioner.blocks, ref_opt.preconditioner.blocks, strict=True):
        for stat, factor in block.factors.items():
            assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-6, (block.name, stat)


def _resume_sharded(rank: int, world_size: int, path: str) -> None:
    from lightning_lbo.optim.kfac.distributed import default_communicator

    saved = torch.load(path, weights_only=False)
    model = ks.shard(ks.make_mlp(), world_size)
    set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
    opt = _kfac(model, default_communicator())
    set_optimizer_state_dict(model, opt, saved["optim"], options=StateDictOptions(full_state_dict=True))
    assert_same_kfac_state(opt.preconditioner.state_dict(), saved["kfac"])
    for p in model.parameters():  # momentum resharded like its parameter
        assert type(opt.state[p]["momentum_buffer"]) is type(p)
    for step in range(SAVED_AT, STEPS):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    reference, _ = _uninterrupted(STEPS, world_size)
    ks.assert_equal_to_reference(model, reference, f"rank {rank}")


def test_kfac_sharded_checkpoint_one_process_resume_at_two_ranks(tmp_path):
    model, opt = _uninterrupted(SAVED_AT, 2)
    path = str(tmp_path / "plain.pt")
    torch.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                "kfac": opt.preconditioner.state_dict()}, path)
    spawn_gloo(_resume_sharded, world_size=2, args=(path,))


def test_kfac_checkpoint_optimizer_state_dict_api_keeps_every_curvature_tensor():
    """One process: get/set_optimizer_state_dict restores the whole K-FAC state (the 9%-off bug of issue 24)."""
    from lightning_lbo.optim.kfac.comm import Communicator

    model, opt = _uninterrupted(SAVED_AT, 1)
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved) == {"state", "param_groups"}
    fresh = ks.make_mlp()
    fresh.load_state_dict(model.state_dict())
    resumed = _kfac(fresh, Communicator())
    set_optimizer_state_dict(fresh, resumed, saved)
    assert_same_kfac_state(resumed.preconditioner.state_dict(), opt.preconditioner.state_dict())
    # and the plain torch format still loads (top-level "kfac")
    again = _kfac(ks.make_mlp(), Communicator())
    again.load_state_dict(opt.state_dict())
    assert_same_kfac_state(again.preconditioner.state_dict(), opt.preconditioner.state_dict())


def test_kfac_checkpoint_flattened_optimizer_state_dict_fails_at_save():
    """``flatten_optimizer_state_dict=True`` (not Lightning's default): its loader would keep only the entries a fresh
    optimizer has, dropping the curvature; saving already fails, loudly (torch flattens no string entries, and each
    layer's curvature names its layer), so no checkpoint that silently restarts K-FAC can be written."""
    import pytest

    model, opt = _uninterrupted(SAVED_AT, 1)
    with pytest.raises(NotImplementedError, match="Flattening optimizer state_dict only supports"):
        get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _dcp_roundtrip(rank: int, world_size: int, path: str) -> None:
    """Lightning's way (ModelParallelStrategy): dcp.save the sharded state; load into the state_dict of a fresh
    optimizer (a template built before any capture: only its keys are read), then set_optimizer_state_dict."""
    import torch.distributed.checkpoint as dcp

    from lightning_lbo.optim.kfac.distributed import default_communicator

    model = ks.shard(ks.make_mlp(), world_size)
    opt = _kfac(model, default_communicator())
    for step in range(SAVED_AT):
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    fresh = ks.shard(ks.make_mlp(), world_size)
    fresh_opt = _kfac(fresh, default_communicator())
    template = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(template, checkpoint_id=path)
    set_optimizer_state_dict(fresh, fresh_opt, template["optim"])
    assert_same_kfac_state(fresh_opt.preconditioner.state_dict(), opt.preconditioner.state_dict())


def test_kfac_sharded_checkpoint_distributed_checkpoint_into_fresh_template(tmp_path):
    spawn_gloo(_dcp_roundtrip, world_size=2, args=(str(tmp_path / "dcp"),))


def test_kfac_checkpoint_resume_with_stale_inverse_equals_uninterrupted_run():
    """Saved at step 3 with factors refreshed (step 2) after the last inversion (step 0), resumed at the inverse
    step 3: the resumed run inverts the current factors, as the uninterrupted one does (before: it kept the
    checkpoint's old inverse, 25% off after 3 steps). Through the plain format and get/set_optimizer_state_dict."""
    import copy

    from lightning_lbo.optim.kfac.comm import Communicator

    reference, _ = _uninterrupted(STEPS, 2)
    for through_api in (False, True):
        model, opt = _uninterrupted(SAVED_AT, 2)
        fresh = ks.make_mlp()
        fresh.load_state_dict(model.state_dict())
        resumed = _kfac(fresh, Communicator())
        if through_api:
            set_optimizer_state_dict(fresh, resumed, get_optimizer_state_dict(model, opt))
        else:
            resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        for step in range(SAVED_AT, STEPS):
            ks.reference_step(fresh, resumed, "mlp", step, 2)
        for p, q in zip(fresh.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q), f"through_api={through_api}: {ks.relative_error(p.detach(), q.detach()):.2e}"


def _save_ddp_kfac(rank: int, world_size: int, path: str) -> None:
    """2 DDP ranks with the communicator of ``strategy="ddp_kfac"`` (owners precondition: grad_worker_fraction 1/2)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    model = ks.make_mlp()
    wrapped = DistributedDataParallel(model)
    opt = _kfac(model, TorchDistributedCommunicator(grad_worker_fraction=0.5))
    for step in range(SAVED_AT):
        opt.zero_grad()
        x, y = ks.part(ks.global_batch("mlp", step), rank, world_size)
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)


def test_kfac_ddp_kfac_checkpoint_two_ranks_resume_in_one_process(tmp_path):
    from lightning_lbo.optim.kfac.comm import Communicator

    path = str(tmp_path / "ddp.pt")
    spawn_gloo(_save_ddp_kfac, world_size=2, args=(path,))
    saved = torch.load(path, weights_only=False)
    model = ks.make_mlp()
    model.load_state_dict(saved["model"])
    opt = _kfac(model, Communicator())
    opt.load_state_dict(saved["optim"])
    assert_same_kfac_state(opt.preconditioner.state_dict(), saved["optim"]["kfac"])
    for step in range(SAVED_AT, STEPS):
        ks.reference_step(model, opt, "mlp", step, 2)
    reference, _ = _uninterrupted(STEPS, 2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert ks.relative_error(p.detach(), q.detach()) <= 1e-6


# ---- resharding across 1, 2 and 4 ranks: full state dicts (Lightning's save_distributed_checkpoint=False) and
# torch.distributed.checkpoint (its default), whose load reshards the saved DTensor shards to the new layout
def _build(world_size: int):
    from lightning_lbo.optim.kfac.comm import Communicator

    if world_size == 1:  # a plain model in one process
        model = ks.make_mlp()
        return model, _kfac(model, Communicator())
    model = ks.shard(ks.make_mlp(), world_size)
    return model, _kfac(model, None)  # its communicator: built on the mesh at bind


def _step(model, opt, step: int, rank: int, world_size: int) -> None:
    if world_size == 1:
        ks.reference_step(model, opt, "mlp", step, 1)
    else:
        ks.sharded_step(model, opt, "mlp", step, rank, world_size)


def _save_at(rank: int, world_size: int, directory: str) -> None:
    """3 steps at ``world_size`` ranks, saved twice: a full state dict (``directory/full.pt``) and a distributed
    checkpoint (``directory/dcp``); rank 0 also keeps the preconditioner's own state to compare with."""
    import torch.distributed.checkpoint as dcp

    model, opt = _build(world_size)
    for step in range(SAVED_AT):
        _step(model, opt, step, rank, world_size)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{directory}/dcp")
    saved = {"model": get_model_state_dict(model, options=FULL),
             "optim": get_optimizer_state_dict(model, opt, options=FULL)}
    if rank == 0:
        torch.save(saved, f"{directory}/full.pt")
        torch.save({"kfac": opt.preconditioner.state_dict(), "skips": int(opt.nonfinite_skips)},
                   f"{directory}/kfac.pt")


def _resume_at(rank: int, world_size: int, directory: str) -> None:
    """Load both checkpoints of ``_save_at`` (any world size) at ``world_size`` ranks, each into a fresh model: the
    whole K-FAC state bit for bit, no curvature tensor dropped, and 3 more steps == 6 uninterrupted ones."""
    import torch.distributed.checkpoint as dcp

    reference, ref_opt = _uninterrupted(STEPS, world_size)
    saved = torch.load(f"{directory}/kfac.pt", weights_only=False)
    for distributed in (False, True):
        model, opt = _build(world_size)
        if distributed:  # Lightning's way: the fresh optimizer's state dict is the template dcp.load fills in
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=f"{directory}/dcp")
            options = StateDictOptions()
        else:
            state = torch.load(f"{directory}/full.pt", weights_only=False)
            options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, opt, state["optim"], options=options)
        assert_same_kfac_state(opt.preconditioner.state_dict(), saved["kfac"])
        assert int(opt.nonfinite_skips) == saved["skips"]
        for p in model.parameters():  # momentum resharded like its parameter (a DTensor iff the parameter is one)
            assert hasattr(opt.state[p]["momentum_buffer"], "full_tensor") == hasattr(p, "full_tensor")
        for step in range(SAVED_AT, STEPS):
            _step(model, opt, step, rank, world_size)
        ks.assert_equal_to_reference(model, reference, f"rank {rank} of {world_size}, distributed={distributed}")
        for block, ref_block in zip(opt.preconditioner.blocks, ref_opt.preconditioner.blocks, strict=True):
            for stat, factor in block.factors.items():
                assert ks.relative_error(factor, ref_block.factors[stat]) <= 1e-6, (block.name, stat)


def _run(fn, world_size: int, *args) -> None:
    if world_size == 1:
        fn(0, 1, *args)
    else:
        spawn_gloo(fn, world_size=world_size, args=args)


@pytest.mark.slow
def test_kfac_sharded_checkpoint_four_ranks_resume_at_two_and_one(tmp_path):
    """Saved at 4 ranks (full and distributed checkpoints), resumed at 2 ranks and in 1 process."""
    _run(_save_at, 4, str(tmp_path))
    _run(_resume_at, 2, str(tmp_path))
    _run(_resume_at, 1, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("saved_at", [1, 2])
def test_kfac_sharded_checkpoint_resume_at_four_ranks(tmp_path, saved_at):
    """Saved in 1 process or at 2 ranks (full and distributed checkpoints), resumed at 4 ranks."""
    _run(_save_at, saved_at, str(tmp_path))
    _run(_resume_at, 4, str(tmp_path))
