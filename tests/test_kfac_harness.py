"""KFAC in the shared optimizer harness (tests/optim_harness.py): the contract every optimizer of the package passes."""

from __future__ import annotations

import pytest

from lightning_lbo.optim.kfac import KFAC
from tests import optim_harness as harness

# every step refreshes factors and inverses, so a skipped step (schedule advanced, nothing committed) leaves a run
# equal to one that never saw the batch
_EVERY_STEP = dict(factor_update_interval=1, inverse_update_interval=1)
_SCHEDULE = ("kfac.next_due.", "kfac.refreshes.")  # per-parameter state entries that count steps, skipped or not


def _factory(params, **kwargs):
    return KFAC(params, lr=0.1, momentum=0.9, weight_decay=1e-3, **_EVERY_STEP, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"fold_weight_decay": True}, {"weight_rescaling": True},
                                    {"momentum_correction": False, "momentum": 0.5}, {"momentum": 0.0}])
def test_kfac_foreach_equals_single_tensor(kwargs):
    """The multi-tensor update equals the one-tensor-at-a-time reference (foreach=False)."""
    harness.check_foreach_equals_loop(KFAC, **{"lr": 0.1, "weight_decay": 1e-3, **_EVERY_STEP, **kwargs})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("foreach", [False, True])
def test_kfac_nonfinite_gradient_skips_the_step(bad, foreach):
    def factory(params):
        return _factory(params, foreach=foreach)

    # .grad holds the preconditioned gradient; the refresh schedule and its attempt count (per-parameter state)
    # advance on a skipped step, as K-FAC's step clock does
    harness.check_nonfinite_gradient_skips_the_step(factory, bad, grads_kept=False, schedule_keys=_SCHEDULE)
    harness.check_skip_request(factory, schedule_keys=_SCHEDULE)


@pytest.mark.parametrize("foreach", [False, True])
def test_kfac_contract(foreach):
    def factory(params):
        return _factory(params, foreach=foreach)

    harness.check_closure_runs_once_with_grad(factory)
    harness.check_resume_continues_exactly(factory)
