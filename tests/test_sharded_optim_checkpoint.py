"""Checkpoints of LARS, LAMB and RMSpropWarmup through ``torch.distributed.checkpoint.state_dict`` (FSDP2).

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what Lightning's ModelParallelStrategy uses)
keep only ``state`` and ``param_groups``; the optimizers copy their optimizer-wide counters
(``nonfinite_skips``, RMSpropWarmup's ``steps_taken`` / ``fractional_epoch``) into the param groups, so
nothing is lost. Oracle: save after 3 steps (one of them skipped) at P ranks, resume at P' ranks
(full state dict, resharded), 3 more steps == 6 uninterrupted steps in one process (float64, <= 1e-6);
every saved state tensor reloads bit-identically; every per-parameter state entry is in the checkpoint.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tests.helpers import sharded
from tests.helpers.ddp import spawn_gloo
from tests.test_sharded_optim import FACTORIES

NAMES = ("lars", "lamb", "rmsprop_warmup")
STATE_KEYS = {"lars": {"scaled_momentum_buffer", "momentum_scale"}, "lamb": {"step", "exp_avg", "exp_avg_sq"},
              "rmsprop_warmup": {"velocity", "square_avg"}}
SKIPPED_STEP, SAVE_AFTER, TOTAL = 1, 3, 6
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _build(name: str, world_size: int):
    model = sharded.make_mlp()
    if world_size > 1:
        sharded.shard(model, world_size)
    return model, FACTORIES[name](model)


def _train(model, opt, steps, rank: int, world_size: int) -> None:
    for step in steps:
        x, y = sharded.rank_batch(step, rank, world_size)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.skip_next_step_where(torch.tensor(step == SKIPPED_STEP))  # a skipped step: nonfinite_skips = 1
        opt.step()


def _save_worker(rank: int, world_size: int, path: str) -> None:
    saved = {}
    for name in NAMES:
        model, opt = _build(name, world_size)
        _train(model, opt, range(SAVE_AFTER), rank, world_size)
        saved[name] = {"model": get_model_state_dict(model, options=FULL),
                       "optim": get_optimizer_state_dict(model, opt, options=FULL)}
    if rank == 0:
        torch.save(saved, path)
    dist.barrier()


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu()), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _resume_worker(rank: int, world_size: int, path: str) -> None:
    saved = torch.load(path, weights_only=False)
    for name in NAMES:
        checkpoint = saved[name]
        for fqn, entries in checkpoint["optim"]["state"].items():  # nothing per-parameter was dropped on save
            assert set(entries) == STATE_KEYS[name], f"{name}: state of {fqn} is {sorted(entries)}"
        assert all(g["nonfinite_skips"] == 1 for g in checkpoint["optim"]["param_groups"]), name
        model, opt = _build(name, world_size)
        set_model_state_dict(model, checkpoint["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, opt, checkpoint["optim"], options=StateDictOptions(full_state_dict=True))
        assert opt.nonfinite_skips.item() == 1, f"{name}: nonfinite_skips lost at load"
        assert all(g["nonfinite_skips"] is None for g in opt.param_groups)  # live groups: placeholders only
        if name == "rmsprop_warmup":
            assert opt.steps_taken == SAVE_AFTER, f"steps_taken lost at load: {opt.steps_taken}"
        # the reloaded state, read back through the same API, is the saved one bit for bit
        # (a full state dict with cpu_offload is returned on rank 0 only; every rank takes part in the gather)
        reread = get_optimizer_state_dict(model, opt, options=FULL)
        if rank == 0:
            _assert_same(reread, checkpoint["optim"], f"{name} reloaded")
        _train(model, opt, range(SAVE_AFTER, TOTAL), rank, world_size)

        ref_model, ref_opt = _build(name, 1)
        _train(ref_model, ref_opt, range(TOTAL), 0, 1)
        for (pname, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            sharded.assert_close_relative(sharded.full(p.detach()), q.detach(), 1e-6, f"{name} resumed {pname}")
        assert opt.nonfinite_skips.item() == 1
    dist.barrier()


@pytest.mark.parametrize("save_world, load_world", [(2, 1), (1, 2), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_sharded_optim_checkpoint_reshards_and_resumes_exactly(save_world, load_world, tmp_path):
    """Save at ``save_world`` ranks (1: a plain model), resume at ``load_world``: the next steps equal an
    uninterrupted run, nothing dropped (state tensors, nonfinite_skips, RMSpropWarmup's steps_taken)."""
    path = str(tmp_path / "checkpoint.pt")
    spawn_gloo(_save_worker, world_size=save_world, args=(path,))
    spawn_gloo(_resume_worker, world_size=load_world, args=(path,))


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", NAMES)
def test_optim_state_dict_api_keeps_optimizer_wide_counters(name, flatten):
    """One process, no sharding: get/set_optimizer_state_dict round trip keeps nonfinite_skips (and
    RMSpropWarmup's steps_taken), which that API drops when they live outside state/param_groups; also with
    ``flatten_optimizer_state_dict=True``, whose loader keeps only the group keys the live groups have."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = _build(name, 1)
    _train(model, opt, range(SAVE_AFTER), 0, 1)
    osd = get_optimizer_state_dict(model, opt, options=options)
    model2, opt2 = _build(name, 1)
    set_optimizer_state_dict(model2, opt2, osd, options=options)
    assert opt2.nonfinite_skips.item() == 1
    if name == "rmsprop_warmup":
        assert opt2.steps_taken == SAVE_AFTER


def _poisoned_shard_worker(rank: int, world_size: int) -> None:
    model, opt = _build("lamb", world_size)
    _train(model, opt, range(2), rank, world_size)
    osd = get_optimizer_state_dict(model, opt)  # sharded: every rank holds its own shards (DTensors)
    if rank == world_size - 1:  # the last rank's shard only: the others hold clean values
        osd["state"]["0.weight"]["exp_avg"].to_local().view(-1)[0] = float("nan")
    fresh_model, fresh_opt = _build("lamb", world_size)
    with pytest.raises(ValueError, match=r"state\['0.weight'\]\['exp_avg'\] \(shape \(7, 6\)\) holds 1 NaN/Inf"):
        set_optimizer_state_dict(fresh_model, fresh_opt, osd)
    dist.barrier()  # every rank refused (a rank that accepted would now train alone and hang its peers)


def test_sharded_optim_load_refuses_a_poisoned_shard_on_every_rank():
    """A NaN in one rank's shard of a sharded checkpoint is refused on every rank (one all-reduce of the counts)."""
    spawn_gloo(_poisoned_shard_worker, world_size=2)
