"""A low-rank A statistic keeps its rows and builds its dense Gram only when a dense factor is read."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner
from lightning_lbo.optim.kfac.factors import LowRankFactor
from tests.test_kfac_host_sync import HostSyncCounter
from tests.test_kfac_low_rank import _dense_factored_solve

aten = torch.ops.aten


class _Wide(nn.Module):
    """Two layers on the low-rank A path at batch 4: a conv with 2x2 output locations (16 rows, d_A = 73) and
    a Linear head (4 rows, d_A = 65)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


#: the (unbordered) shapes of the two layers' A Gram products
GRAM_SHAPES = {(1, 72, 72), (1, 64, 64)}


class GramCounter(TorchDispatchMode):
    """Counts the batched products whose output has the shape of a wide layer's A Gram."""

    def __init__(self) -> None:
        super().__init__()
        self.grams = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (aten.bmm.default, aten.baddbmm.default) and tuple(out.shape) in GRAM_SHAPES:
            self.grams += 1
        return out


def _batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 5, 5, generator=g), torch.randint(0, 10, (n,), generator=g)


def _steps_under(model: nn.Module, opt: KFAC, steps: int, mode: type[TorchDispatchMode]) -> list:
    """``steps`` training steps, each under a new dispatch mode ``mode()``; the modes."""
    modes = []
    for step in range(steps):
        x, y = _batch(step)
        with mode() as watched:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        modes.append(watched)
    return modes


def test_kfac_lazy_low_rank_refresh_builds_no_dense_gram():
    """Refresh and inversion steps of low-rank layers build no d_A x d_A Gram; reading the factors builds each
    once (then cached), and the inverse is the Woodbury one."""
    torch.manual_seed(0)
    model = _Wide()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=1, inverse_update_interval=2)
    counts = [counter.grams for counter in _steps_under(model, opt, 4, GramCounter)]
    pre = opt.preconditioner
    assert counts == [0, 0, 0, 0]
    assert all("A_rows" in pre.inverse(layer).data for layer in (model.conv, model.head))
    with GramCounter() as counter:
        pre.factors(model.conv)
        pre.factors(model.conv)
        pre.factors(model.head)
    assert counter.grams == 2


#: refreshes: normal, non-finite, skipped by the optimizer, a smaller batch, two micro-batches; each plan ends
#: with refreshes that are not committed, whose factor is the last committed one (or the first's identity)
PLANS = {"mixed": [("normal", 4), ("nan", 4), ("skip", 4), ("normal", 2), ("accumulate", 4), ("normal", 4),
                   ("nan", 4), ("skip", 4)],
         "first_not_finite": [("nan", 4), ("skip", 4)]}


def _run(low_rank: bool, plan: str, read_every_step: bool) -> list[list[dict[str, torch.Tensor]]]:
    """Preconditioner only (weights fixed) through ``PLANS[plan]``: the state_dict factors after each step (or
    only at the end)."""
    torch.manual_seed(0)
    model = _Wide()
    pre = KFACPreconditioner(model, kl_clip=None, low_rank_inverse=low_rank, factor_update_interval=1,
                             inverse_update_interval=3, damping=1e-2)
    states = []
    for step, (kind, n) in enumerate(PLANS[plan]):
        model.zero_grad()
        x, y = _batch(step, n)
        if kind == "nan":
            x[0, 0, 0, 0] = float("nan")
        chunks = 2 if kind == "accumulate" else 1
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            (F.cross_entropy(model(xc), yc) / chunks).backward()
        pre.step(keep=torch.tensor(kind != "skip"))
        if read_every_step or step == len(PLANS[plan]) - 1:
            states.append([entry["factors"] for entry in pre.state_dict()["blocks"]])
    return states


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("read_every_step", [True, False])
def test_kfac_lazy_low_rank_factors_equal_the_eager_path_bit_for_bit(plan, read_every_step):
    """The dense factors of a deferred low-rank A (state_dict, accessor) are bit for bit those of the eager
    path (low_rank_inverse=False builds them at capture), through non-finite and skipped refreshes, a
    batch-size change and gradient accumulation, whether they are read at every step or only at the end."""
    lazy, eager = _run(True, plan, read_every_step), _run(False, plan, read_every_step)
    assert len(lazy) == len(eager) == (len(PLANS[plan]) if read_every_step else 1)
    for lazy_step, eager_step in zip(lazy, eager, strict=True):
        for a, b in zip(lazy_step, eager_step, strict=True):
            assert a.keys() == b.keys() == {"A", "G"}
            for stat in a:
                assert torch.equal(a[stat], b[stat]), stat


def test_kfac_lazy_low_rank_step_matches_dense_fp64_solve():
    """After a refresh that built no Gram, each low-rank layer's step is the dense fp64 solve with the factors
    read afterwards (within 1e-4)."""
    torch.manual_seed(0)
    model = _Wide()
    damping = 1e-2
    pre = KFACPreconditioner(model, kl_clip=None, damping=damping)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    blocks = [pre.block(model.conv), pre.block(model.head)]
    grads = [block.grad_matrix().clone() for block in blocks]
    pre.step()
    for block, grad in zip(blocks, grads, strict=True):
        assert block.stored["A"].deferred
        factors = pre.factors(block.name)
        want = _dense_factored_solve(factors["A"][0].double(), factors["G"][0].double(), grad, damping)
        got = block.grad_matrix()[0].double()
        assert ((got - want).norm() / want.norm()).item() <= 1e-4


def _train(model, opt, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        if step == 3:
            x[1, 2, 0, 0] = float("inf")  # a non-finite batch: the refresh is skipped
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("checkpoint_at", [4, 5])
def test_kfac_lazy_low_rank_resume_is_bit_identical(checkpoint_at):
    """A run checkpointed after a refresh not yet inverted (4) or right after an inversion (5), then resumed,
    equals a run never checkpointed (whose deferred factors are never built) bit for bit."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, factor_update_interval=1, inverse_update_interval=3)
    torch.manual_seed(0)
    straight = _Wide()
    start = copy.deepcopy(straight.state_dict())
    _train(straight, KFAC(straight, **kw), range(9))

    first = _Wide()
    first.load_state_dict(start)
    opt = KFAC(first, **kw)
    _train(first, opt, range(checkpoint_at))
    assert isinstance(opt.preconditioner.block(first.conv).stored["A"], LowRankFactor)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = _Wide()
    resumed.load_state_dict(saved_model)
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(checkpoint_at, 9))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_kfac_lazy_low_rank_refresh_steps_make_no_host_sync():
    """Refresh steps that invert nothing (the deferred factor decided on the device) make no host sync either."""
    torch.manual_seed(0)
    model = _Wide()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_update_interval=1, inverse_update_interval=3)
    counters = _steps_under(model, opt, 6, HostSyncCounter)
    quiet = [counter.ops for step, counter in enumerate(counters) if step % 3]
    assert opt.preconditioner.block(model.head).stored["A"].deferred
    assert quiet == [[]] * 4
