"""LARS, LAMB and RMSpropWarmup on sharded parameters (``fully_shard``, FSDP2; 2 and 4 CPU ranks with gloo).

Oracle: P ranks with ``1/P`` of the global batch each and ``DTensor`` parameters equal one plain process on
the whole global batch (float64, <= 1e-6 relative, every step). A trust ratio from per-shard norms instead
of whole-parameter norms breaks it at the first step. A gradient made non-finite on ONE rank's shard skips
the step on every rank (all ranks count it), and the run continues as if the batch had not been seen.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup
from lightning_lbo.param_groups import param_groups
from tests.helpers import sharded
from tests.helpers.ddp import REPO_ROOT, run_script, spawn_gloo

STEPS, BAD_STEP, RTOL = 7, 3, 1e-6
FACTORIES_LIGHTNING = ("LARS", "LAMB", "RMSpropWarmup")  # what tests/scripts/sharded_optim_lightning.py runs
# all-reduces one optimizer step adds to FSDP2's own collectives (the MLP: 8 tensors; LAMB: one for the skip
# decision, then ||w|| and ||u|| together per param group, or per tensor on the loop path)
ALL_REDUCES_PER_STEP = {"lars": 1, "lars_paper_nesterov_clip": 1, "lars_loop": 1, "lamb": 2, "lamb_foreach_clip": 2,
                        "lamb_loop": 9, "rmsprop_warmup": 1, "rmsprop_warmup_loop": 1}

# name -> optimizer factory (the model is plain or fully_shard-ed; the factory cannot tell)
FACTORIES: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "lars": lambda m: LARS(param_groups(m, weight_decay=1e-3), lr=0.5, momentum=0.9, weight_decay=1e-3,
                           trust_coefficient=0.02),
    "lars_paper_nesterov_clip": lambda m: LARS(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3,
                                               trust_coefficient=0.02, momentum_form="paper", nesterov=True,
                                               clip=True),
    "lars_loop": lambda m: LARS(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
                                foreach=False),
    "lamb": lambda m: LAMB(m.parameters(), lr=0.02, weight_decay=0.01),
    "lamb_foreach_clip": lambda m: LAMB(m.parameters(), lr=0.02, weight_decay=0.01, fused=False, max_trust_ratio=2.0),
    "lamb_loop": lambda m: LAMB(m.parameters(), lr=0.02, weight_decay=0.01, foreach=False),
    "rmsprop_warmup": lambda m: RMSpropWarmup(m.parameters(), lr=0.1, lr_rmsprop=1e-2, weight_decay=1e-3,
                                              steps_per_epoch=1, beta_center=3.0, beta_period=4.0),
    "rmsprop_warmup_loop": lambda m: RMSpropWarmup(m.parameters(), lr=0.1, lr_rmsprop=1e-2, steps_per_epoch=1,
                                                   beta_center=3.0, beta_period=4.0, foreach=False),
}


def _train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _count_all_reduces(fn: Callable[[], object]) -> int:
    """How many ``torch.distributed.all_reduce`` calls ``fn()`` makes."""
    calls = []
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = all_reduce
    return len(calls)


def _equality_worker(rank: int, world_size: int, names: list[str], errors_out: str) -> None:
    worst = {}
    for name in names:
        ref_model = sharded.make_mlp()
        ref_opt = FACTORIES[name](ref_model)
        model = sharded.shard(sharded.make_mlp(), world_size)
        opt = FACTORIES[name](model)
        worst[name] = 0.0
        for step in range(STEPS):
            x, y = sharded.rank_batch(step, rank, world_size)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == BAD_STEP and rank == world_size - 1:
                # one entry of the LAST rank's shard only: the other ranks' gradients are all finite
                local = next(p.grad.to_local() for p in model.parameters() if p.grad.to_local().numel())
                local.view(-1)[0] = float("nan")
            calls = _count_all_reduces(opt.step)
            assert calls == ALL_REDUCES_PER_STEP[name], f"{name}: {calls} all-reduces in one step"
            # the reference skips the bad step on request (host-side counts such as RMSpropWarmup's steps_taken
            # advance on a skipped step too)
            ref_opt.skip_next_step_where(torch.tensor(step == BAD_STEP))
            _train_step(ref_model, ref_opt, *sharded.global_batch(step, world_size))
            for (pname, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
                whole = sharded.full(p.detach())
                sharded.assert_close_relative(whole, q.detach(), RTOL, f"{name} step {step} {pname}")
                err = (torch.linalg.vector_norm(whole - q) / torch.linalg.vector_norm(q)).item()
                worst[name] = max(worst[name], err)
        # the skip was decided and counted alike on every rank; the replicated 0-d state is identical
        counts = [None] * world_size
        scalars = [s.item() for st in opt.state.values() for s in st.values() if s.dim() == 0]
        dist.all_gather_object(counts, (opt.nonfinite_skips.item(), scalars))
        assert all(c == (1, scalars) for c in counts), f"{name}: ranks disagree: {counts}"
        assert ref_opt.nonfinite_skips.item() == 1
    if rank == 0:
        with open(errors_out, "w") as f:
            f.write(repr(worst))
    dist.barrier()  # no rank tears the process group down while another is still in a collective


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_optim_equals_one_process(world_size, tmp_path):
    """Every optimizer (and its foreach / fused / loop paths) on fully_shard-ed parameters == one process."""
    out = tmp_path / "errors.txt"
    spawn_gloo(_equality_worker, world_size=world_size, args=(list(FACTORIES), str(out)))
    worst = eval(out.read_text())  # {name: worst relative error over steps and parameters}
    assert set(worst) == set(FACTORIES)
    print(f"P={world_size} worst relative error vs one process: {worst}")


def test_sharded_optim_lightning_model_parallel_strategy(tmp_path):
    """Trainer(strategy=ModelParallelStrategy(data_parallel_size=2)) with LARS/LAMB/RMSpropWarmup(self.parameters())
    trains and equals one process on the global batches, also across a save and resume through Lightning's
    distributed checkpoint (the script asserts; see its docstring)."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "sharded_optim_lightning.py", str(tmp_path), timeout=600)
    assert "sharded Lightning == one process" in out.stdout
    assert out.stdout.count("Lightning checkpoint 3 + 3 steps == 6 uninterrupted steps") == len(FACTORIES_LIGHTNING)


def _fsdp1_worker(rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (True, False):
        model = FullyShardedDataParallel(sharded.make_mlp(), use_orig_params=use_orig_params,
                                         device_id=torch.device("cpu"))
        for factory in (FACTORIES["lars"], FACTORIES["lamb"], FACTORIES["rmsprop_warmup"]):
            with pytest.raises(ValueError, match=r"FSDP1 parameters .* Shard with fully_shard \(FSDP2"):
                factory(model)
    dist.barrier()


def test_sharded_optim_refuses_fsdp1_parameters():
    """FSDP1 (what Lightning's FSDPStrategy wraps with; it runs on CPU through torch directly) hands the optimizer
    flattened pieces of parameters: per-tensor trust ratios would be per-piece. Refused at construction."""
    spawn_gloo(_fsdp1_worker, world_size=2)


def _all_finite_worker(rank: int, world_size: int) -> None:
    from lightning_lbo.optim._step_utils import all_finite

    model = sharded.shard(sharded.make_mlp(), world_size)
    F.cross_entropy(model(sharded.rank_batch(0, rank, world_size)[0]), sharded.rank_batch(0, rank, world_size)[1]
                    ).backward()
    grads = [p.grad for p in model.parameters()]
    assert all_finite(grads).item()
    if rank == world_size - 1:
        grads[0].to_local().view(-1)[0] = float("inf")
    decision = all_finite(grads, device=torch.device("cpu"))
    assert type(decision) is torch.Tensor  # a plain 0-d bool, combinable with the guard's own flags
    bad = torch.zeros((), dtype=torch.bool) | ~decision  # what NonFiniteBatchGuard does with it
    assert bad.item(), f"rank {rank} missed the Inf in rank {world_size - 1}'s shard"
    dist.barrier()


def test_sharded_all_finite_decides_over_whole_tensors():
    """all_finite (what NonFiniteBatchGuard calls) on DTensor gradients: an Inf in one rank's shard is seen by all."""
    spawn_gloo(_all_finite_worker, world_size=2)
