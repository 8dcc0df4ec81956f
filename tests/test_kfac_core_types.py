"""The v3 core's types: factor types and their arithmetic, settings objects and the derived signature, the flat
block state and its checkpoint entry, per-preconditioner block types and the LinearVariant enum."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.optim.kfac import (
    BLOCK_TYPES,
    KFAC,
    DenseFactor,
    DiagonalFactor,
    KFACPreconditioner,
    LinearBlock,
    LinearVariant,
    LowRankFactor,
    StaleStatistics,
)
from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac.blocks import default_block_types
from lightning_lbo.optim.kfac.blocks.base import _gram_with_ones
from lightning_lbo.optim.kfac.checkpoint import flat_block_state, nested_block_state
from lightning_lbo.optim.kfac.inverses import CholeskyKronecker
from lightning_lbo.optim.kfac.inversion import WoodburyKronecker, method_for


def _rows(seed=0, r=3, d=5):
    return torch.randn(1, r, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kfac_factor_total_low_rank_parts_equal_dense_gram_over_n():
    """Two micro-batches of rows: the low-rank factor's dense value (built when read) is ``[U, 1]^T [U, 1] / n``,
    its rows are the concatenated ``[U, 1]``, its trace comes from the rows, and nothing goes on the wire."""
    raw = [_rows(0), _rows(1)]
    parts = [LowRankFactor.part(torch.cat([u, torch.ones(1, 3, 1, dtype=u.dtype)], 2), raw=u, gram=_gram_with_ones,
                                dtype=torch.float64) for u in raw]
    n = 6
    factor = fac.total(parts, n, per_example=False)
    assert isinstance(factor, LowRankFactor) and factor.deferred and fac.wire(parts[0]) == []
    U = torch.cat([torch.cat([u, torch.ones(1, 3, 1, dtype=u.dtype)], 2) for u in raw], 1)
    torch.testing.assert_close(factor.rows, U, rtol=0, atol=0)
    want = U.transpose(1, 2) @ U / n
    torch.testing.assert_close(factor.mean_trace(torch.float64), want.diagonal(dim1=1, dim2=2).mean(1))
    torch.testing.assert_close(factor.dense(), want)
    assert not factor.deferred


def test_kfac_factor_total_scales_output_statistics_per_example():
    """Output statistics of ``dL/dy`` become per-example ones (``n * sum``), rows ``n * W`` (``U^T U / n``)."""
    W = _rows(2)
    part = LowRankFactor.part(W, value=W.transpose(1, 2) @ W)
    factor = fac.total([part, part], 4, per_example=True)
    torch.testing.assert_close(factor.dense(), 4 * 2 * W.transpose(1, 2) @ W)
    torch.testing.assert_close(factor.rows.transpose(1, 2) @ factor.rows / 4, factor.dense())
    dense = fac.total([torch.eye(2).unsqueeze(0)] * 2, 4, per_example=False, kind=DiagonalFactor)
    assert type(dense) is DiagonalFactor and torch.equal(dense.dense(), torch.eye(2).unsqueeze(0) / 2)


@pytest.mark.parametrize("ok", [True, False])
def test_kfac_factor_commit_is_running_average_where_ok(ok):
    """Dense: ``lerp(old, new, decay)`` where ok, the old factor otherwise; low-rank: the old dense value and NaN
    rows (so the Woodbury inverse fails over to the dense one) when not ok."""
    old, new = DenseFactor(torch.eye(3).unsqueeze(0)), DenseFactor(3 * torch.eye(3).unsqueeze(0))
    flag = torch.tensor(ok)
    out = new.committed(old, flag, 0.25, torch.tensor(True), lambda: None)
    torch.testing.assert_close(out.dense(), (1.5 if ok else 1.0) * torch.eye(3).unsqueeze(0))
    fresh = new.committed(None, flag, 0.25, torch.tensor(False), lambda: torch.eye(3).unsqueeze(0))
    torch.testing.assert_close(fresh.dense(), (3.0 if ok else 1.0) * torch.eye(3).unsqueeze(0))
    W = _rows(3)  # [1, 3, 5]
    old5 = DenseFactor(torch.eye(5, dtype=W.dtype).unsqueeze(0))
    low = LowRankFactor(W, 2, W.transpose(1, 2) @ W / 2).committed(old5, flag, 1.0, torch.tensor(True), lambda: None)
    assert isinstance(low, LowRankFactor) and bool(torch.isfinite(low.rows).all()) == ok
    torch.testing.assert_close(low.dense(), W.transpose(1, 2) @ W / 2 if ok else old5.dense())


def test_kfac_inverse_method_follows_from_factor_types():
    dense = {"A": DenseFactor(torch.eye(2).unsqueeze(0)), "G": DenseFactor(torch.eye(2).unsqueeze(0))}
    low = {**dense, "A": LowRankFactor(_rows(), 3, torch.eye(5).unsqueeze(0))}
    assert method_for(CholeskyKronecker, dense, allow_low_rank=True) is CholeskyKronecker
    assert method_for(CholeskyKronecker, low, allow_low_rank=True) is WoodburyKronecker
    assert method_for(CholeskyKronecker, low, allow_low_rank=False) is CholeskyKronecker


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 64), nn.Tanh(), nn.Linear(64, 3))


def _train(model, pre, steps):
    for t in steps:
        g = torch.Generator().manual_seed(t)
        model.zero_grad()
        F.cross_entropy(model(torch.randn(8, 1, 8, 8, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        pre.step(lr=0.1)


def test_kfac_block_state_is_flat_and_round_trips_through_the_checkpoint_entry():
    """A block's state is a flat dict of named tensors and numbers (low-rank rows included); the checkpoint entry
    is its nested form (the format of earlier checkpoints), and converting back gives the same flat state."""
    model = _conv_net()
    pre = KFACPreconditioner(model, factor_update_interval=1, inverse_update_interval=2)
    _train(model, pre, range(2))  # step 1 refreshed A after the inversion at step 0: the inverse source is older
    state = pre.blocks[1].state()
    assert all("." in key or key == "inverse_damping" for key in state)
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    assert {"factor.A", "factor.G", "inverse.A", "inverse.A.rows", "inverse.A.n", "next_due.A"} <= set(state)
    entry = nested_block_state(state)
    assert {"rows", "n", "A"} <= set(entry["inverse_factors"]) and set(entry["factors"]) == {"A", "G"}
    back = flat_block_state(entry)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) if isinstance(v, torch.Tensor) else back[k] == v for k, v in state.items())


def test_kfac_signature_is_derived_from_every_setting():
    """Every constructor setting appears in the signature (none listed by hand); it is picklable, rank-independent
    (callables by qualified name, enums by value) and changes when a setting changes."""
    def damping(step):
        return 1e-3

    pre = KFACPreconditioner(_conv_net(), damping=damping, stale_statistics=StaleStatistics(threshold=0.2),
                             linear_variant="reduce", exclude=[nn.Tanh])
    signature = pre.signature()
    assert pickle.loads(pickle.dumps(signature)) == signature
    settings = signature["settings"]
    for name in ("damping", "factor_decay", "factor_update_interval", "inverse_update_interval", "inverse_method",
                 "fisher", "likelihood", "output_to_logits", "kl_clip", "stale_statistics", "exclude",
                 "linear_variant", "l2", "low_rank_inverse"):
        assert sum(key.endswith("." + name) for key in settings) == 1, name
    assert settings["inverses.damping"].endswith("damping") and settings["curvature.linear_variant"] == "reduce"
    assert settings["schedule.stale_statistics"]["threshold"] == 0.2 and settings["factor_dtype"] == "torch.float32"
    assert signature["layers"][0] == "0: Conv2dBlock ((1, 10, 10), (1, 4, 4))"
    other = KFACPreconditioner(_conv_net(), damping=damping, stale_statistics=StaleStatistics(threshold=0.3),
                               linear_variant="reduce", exclude=[nn.Tanh])
    assert other.signature() != signature


def test_kfac_settings_read_under_constructor_names_and_are_frozen():
    pre = KFACPreconditioner(_conv_net(), damping=2e-3, factor_decay=0.5, inverse_method="eigen")
    assert (pre.damping, pre.factor_decay, pre.inverse_method.value) == (2e-3, 0.5, "eigen")
    with pytest.raises(AttributeError):
        pre.damping = 1.0
    with pytest.raises(Exception, match="cannot assign"):
        pre.schedule.factor_decay = 1.0


def test_kfac_linear_variant_is_an_enum_and_strings_still_work():
    """``LinearVariant.REDUCE`` and ``"reduce"`` build the same preconditioner; a bad value names the choices."""
    results = []
    for variant in (LinearVariant.REDUCE, "reduce"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        pre = KFACPreconditioner(model, linear_variant=variant, kl_clip=None)
        model(torch.randn(3, 5, 4)).sum().backward()
        pre.step()
        assert pre.linear_variant is LinearVariant.REDUCE and pre.blocks[0].variant is LinearVariant.REDUCE
        results.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with pytest.raises(ValueError, match=r"Invalid linear_variant: 'mean'. Supported: \('expand', 'reduce'\)"):
        KFACPreconditioner(nn.Linear(2, 2), linear_variant="mean")


class _Scaled(nn.Linear):
    pass


class _CountingBlock(LinearBlock):
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1


def test_kfac_block_types_per_preconditioner_leave_the_global_registry_alone():
    """``block_types=`` maps a module type for one preconditioner (subclasses resolved along the MRO); the global
    registry, the explicit default map and other preconditioners are unchanged."""
    before = dict(BLOCK_TYPES)
    model = nn.Sequential(_Scaled(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = KFACPreconditioner(model, block_types={_Scaled: _CountingBlock})
    assert [type(b) for b in pre.blocks] == [_CountingBlock, LinearBlock] and _CountingBlock.built == 1
    assert dict(BLOCK_TYPES) == before and _Scaled not in default_block_types()
    plain = KFACPreconditioner(copy.deepcopy(model))
    assert [type(b) for b in plain.blocks] == [LinearBlock, LinearBlock]
    with pytest.raises(TypeError, match="CurvatureBlock subclass"):
        KFACPreconditioner(model, block_types={nn.Linear: object})


def test_kfac_blocks_state_is_read_only():
    """Blocks own their state: the preconditioner's readers get read-only views."""
    model = _conv_net()
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    _train(model, opt.preconditioner, range(1))
    block = opt.preconditioner.blocks[0]
    with pytest.raises(TypeError):
        block.interval["A"] = 3
    with pytest.raises(AttributeError):
        block.owner = None
