"""Pure LR schedules: exact values at every boundary, composition, validation, the LambdaLR adapter."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lightning_lbo import schedules as S


def test_linear_warmup_goyal_boundaries():
    """Goyal: 0.1 -> 3.2 (k = 32) with a constant increment per step over the warmup."""
    w = S.linear_warmup(steps=10, start_factor=1 / 32)
    lrs = [3.2 * w(t) for t in range(12)]
    assert lrs[0] == pytest.approx(0.1, abs=1e-15)
    assert lrs[10] == 3.2 and lrs[11] == 3.2
    increments = [b - a for a, b in zip(lrs[:10], lrs[1:11], strict=True)]
    assert increments == pytest.approx([(3.2 - 0.1) / 10] * 10, rel=1e-12)
    assert w(9.5) == pytest.approx(1 / 32 + (1 - 1 / 32) * 0.95, rel=1e-15)


def test_linear_warmup_zero_one_step_and_start_zero():
    """Warmup of 0 steps is no warmup; 1 step runs step 0 at the start factor; start 0 gives LR 0 at step 0."""
    assert [S.linear_warmup(0, 0.1)(t) for t in (0, 1, 5)] == [1.0, 1.0, 1.0]
    assert [S.linear_warmup(1, 0.25)(t) for t in (0, 0.5, 1, 2)] == [0.25, 0.625, 1.0, 1.0]
    mlperf = S.linear_warmup(4, 0.0)
    assert [mlperf(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_constant_and_exponential_warmup_boundaries():
    """Constant warmup jumps to 1 at its end; exponential grows by a constant ratio to exactly 1."""
    c = S.constant_warmup(3, 0.1)
    assert [c(t) for t in (0, 2, 2.999, 3, 4)] == [0.1, 0.1, 0.1, 1.0, 1.0]
    e = S.exponential_warmup(4, 1 / 16)
    vals = [e(t) for t in range(6)]
    assert vals == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 1.0], rel=1e-14)
    assert S.exponential_warmup(0, 0.5)(0) == 1.0


def test_poly_boundaries_and_end_factor():
    """poly(p): 1 at 0, (1 - t/T)^p inside, end_factor at T and after."""
    p = S.poly(steps=100, power=2.0)
    assert p(0) == 1.0 and p(50) == 0.25 and p(100) == 0.0 and p(150) == 0.0
    q = S.poly(steps=10, power=3.5, end_factor=0.01)
    assert q(0) == 1.0 and q(10) == pytest.approx(0.01, abs=1e-16) and q(11) == pytest.approx(0.01, abs=1e-16)
    assert q(4) == pytest.approx(0.01 + 0.99 * 0.6**3.5, rel=1e-14)
    assert S.poly(1, 1.0)(0) == 1.0 and S.poly(1, 1.0)(1) == 0.0


def test_cosine_boundaries():
    """Cosine: 1 at 0, midpoint (1 + end)/2, end at T and after."""
    c = S.cosine(steps=8, end_factor=0.1)
    assert c(0) == 1.0
    assert c(4) == pytest.approx(0.55, rel=1e-15)
    assert c(8) == pytest.approx(0.1, abs=1e-15) and c(100) == pytest.approx(0.1, abs=1e-15)
    assert c(2) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)


def test_step_decay_goyal_milestones():
    """Goyal: /10 at epochs 30, 60, 80; the milestone step itself already runs at the lower LR."""
    s = S.per_epoch(S.step_decay([30, 60, 80], gamma=0.1), steps_per_epoch=10)
    assert s(0) == 1.0 and s(299) == 1.0 and s(300) == 0.1 and s(599) == 0.1
    assert s(600) == pytest.approx(0.01) and s(799) == pytest.approx(0.01)
    assert s(800) == pytest.approx(0.001) and s(10_000) == pytest.approx(0.001)


def test_akiba_slow_start_epoch_boundaries():
    """Akiba: 0.5 / 0.075 / 0.01 / 0.001 over epochs 0-39 / 40-69 / 70-84 / 85-89."""
    a = S.akiba_slow_start()
    table = {0: 0.5, 39.99: 0.5, 40: 0.075, 69.5: 0.075, 70: 0.01, 84.9: 0.01, 85: 0.001, 89.9: 0.001}
    assert {e: a(e) for e in table} == table
    steps = S.per_epoch(a, steps_per_epoch=5)
    assert [steps(t) for t in (199, 200, 349, 350, 424, 425)] == [0.5, 0.075, 0.075, 0.01, 0.01, 0.001]


def test_akiba_slow_start_scaled_to_run_length():
    """On request the 40/70/85-of-90 boundaries are scaled to the run: 18 epochs -> 8, 14, 17."""
    a = S.akiba_slow_start(epochs=18)
    assert [a(e) for e in (7.99, 8, 13.99, 14, 16.99, 17)] == [0.5, 0.075, 0.075, 0.01, 0.01, 0.001]


def test_join_each_boundary_optax_semantics():
    """join runs schedules[i](t - boundaries[i-1]); the boundary step belongs to the next schedule."""
    seen = []

    def rec(tag):
        return lambda t: seen.append((tag, t)) or 1.0

    j = S.join([rec("a"), rec("b"), rec("c")], [3, 7])
    for t in (0, 2, 3, 6, 7, 9):
        j(t)
    assert seen == [("a", 0), ("a", 2), ("b", 0), ("b", 3), ("c", 0), ("c", 2)]
    assert S.join([S.constant(2.0), S.constant(3.0)], [0])(0) == 3.0  # empty first phase


def test_warmup_then_poly_goyal_lars():
    """Warmup then poly(2): start at 1/k, 1 at the warmup end, poly over the rest, 0 at the end."""
    s = S.warmup_then(S.poly(steps=90, power=2.0), warmup_steps=10, start_factor=1 / 8)
    assert s(0) == 1 / 8
    assert s(5) == pytest.approx(1 / 8 + 7 / 8 * 0.5, rel=1e-15)
    assert s(10) == 1.0
    assert s(55) == pytest.approx(0.25, rel=1e-15)
    assert s(100) == 0.0


def test_warmup_then_absolute_decay_multiplies():
    """With relative=False the ramp multiplies a decay counted from step 0 (Akiba's epochs)."""
    slow = S.per_epoch(S.akiba_slow_start(), steps_per_epoch=2)
    s = S.warmup_then(slow, warmup_steps=4, start_factor=0.0, relative=False)
    assert [s(t) for t in (0, 2, 4, 79, 80)] == [0.0, 0.25, 0.5, 0.5, 0.075]
    c = S.warmup_then(S.constant(), 3, 0.2, kind="constant")
    assert [c(t) for t in (0, 2, 3)] == [0.2, 0.2, 1.0]


@pytest.mark.parametrize("build, match", [
    (lambda: S.linear_warmup(-1, 0.1), "Invalid warmup steps"),
    (lambda: S.linear_warmup(5, float("nan")), "Invalid start_factor"),
    (lambda: S.linear_warmup(float("inf"), 0.1), "Invalid warmup steps"),
    (lambda: S.exponential_warmup(5, 0.0), "exponential warmup needs 0 < start_factor"),
    (lambda: S.poly(10, 2.0, end_factor=-0.1), "must not become negative"),
    (lambda: S.poly(0, 2.0), "Invalid decay steps"),
    (lambda: S.poly(10, 0.0), "Invalid power"),
    (lambda: S.cosine(10, end_factor=-1), "must not become negative"),
    (lambda: S.step_decay([30, 10]), "increasing order"),
    (lambda: S.step_decay([30], gamma=-0.1), "Invalid gamma"),
    (lambda: S.piecewise_constant([1], [1.0, -0.5]), "Invalid value"),
    (lambda: S.piecewise_constant([1, 2], [1.0]), "need 3 values"),
    (lambda: S.join([S.constant()], [5]), "need 2 schedules"),
    (lambda: S.per_epoch(S.constant(), 0), "Invalid steps_per_epoch"),
    (lambda: S.akiba_slow_start(epochs=0), "Invalid epochs"),
    (lambda: S.warmup_then(S.constant(), 5, 0.1, kind="cubic"), "Supported"),
])
def test_schedule_bad_input_raises(build, match):
    """Negative, non-finite and inconsistent arguments fail at construction with the fix named."""
    with pytest.raises(ValueError, match=match):
        build()


def test_check_schedule_reports_negative_step():
    """A custom schedule that goes negative is caught with the step where it happens."""
    with pytest.raises(ValueError, match="at step 6"):
        S.check_schedule(lambda t: 1.0 - t / 5, total_steps=10)
    with pytest.raises(ValueError, match="nan"):
        S.check_schedule(lambda t: float("nan"), total_steps=1)
    S.check_schedule(S.warmup_then(S.poly(10), 5, 0.0), total_steps=15)


def test_lambda_lr_adapter_matches_schedule():
    """The LambdaLR adapter gives base_lr * schedule(t) at optimizer step t for every param group."""
    sched = S.warmup_then(S.cosine(6, end_factor=0.1), warmup_steps=3, start_factor=0.0)
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.4}, {"params": [b], "lr": 0.1}], lr=1.0, momentum=0.9)
    lr_sched = S.lambda_lr(opt, sched)
    for t in range(11):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4 * sched(t), 0.1 * sched(t)], rel=1e-15)
        opt.step()
        lr_sched.step()
    config = S.lightning_scheduler(opt, sched)
    assert config["lr_scheduler"]["interval"] == "step" and config["optimizer"] is opt


def test_lambda_lr_rejects_object_without_param_groups():
    """An object without param groups is rejected with a clear error."""
    with pytest.raises(ValueError, match="no param_groups"):
        S.lambda_lr(object(), S.constant())


def test_schedules_pickle_and_compare():
    """Built-in schedules survive pickling (ddp_spawn) and compare by value."""
    s = S.warmup_then(S.per_epoch(S.step_decay([3, 6]), 4), 2, 0.5, relative=False)
    t = pickle.loads(pickle.dumps(s))
    assert t == s and [t(i) for i in range(30)] == [s(i) for i in range(30)]
