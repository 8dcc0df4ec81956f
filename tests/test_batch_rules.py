"""Batch-size rules: each rule's decision on constructed observations, validation, state."""

from __future__ import annotations

import math

import pytest

from lightning_lbo.batch_rules import HessianRule, NoiseScaleRule, Observation, RampRule, make_rule


def obs(epoch: int, factor: int, eigenvalue: float | None = None, b_simple: float | None = None,
        base: int = 128) -> Observation:
    return Observation(epoch=epoch, factor=factor, global_batch=base * factor, eigenvalue=eigenvalue,
                       b_simple=b_simple)


def test_hessian_rule_grows_at_half_the_reference_or_after_duration():
    """Doubles at half the reference (reference reset), or after `duration` epochs without growth."""
    rule = HessianRule(eigenvalue_ratio=0.5, duration=3)
    assert rule.decide(obs(0, 1, 10.0)) == 1 and rule.reference == 10.0  # first measurement = reference
    assert rule.decide(obs(1, 1, 6.0)) == 1  # 6 > 5
    assert rule.decide(obs(2, 1, 5.0)) == 2 and rule.reference == 5.0  # 5 <= 0.5 * 10: grow, reset
    assert [rule.decide(obs(3 + i, 2, 4.0)) for i in range(3)] == [2, 2, 4]  # duration 3 without growth
    assert rule.decide(obs(6, 4, math.nan)) == 4 and rule.decisions_since_increase == 0  # no measurement: keep
    clone = HessianRule(eigenvalue_ratio=0.5, duration=3)
    clone.load_state_dict(rule.state_dict())
    assert clone.decide(obs(7, 4, 1.9)) == rule.decide(obs(7, 4, 1.9)) == 8


def test_noise_scale_rule_grows_while_b_simple_exceeds_the_batch_by_the_margin():
    """Grows by `growth` when B_simple >= margin x global batch, keeps the batch otherwise or without data."""
    rule = NoiseScaleRule(margin=2.0)
    assert rule.decide(obs(0, 1, b_simple=255.0)) == 1  # 255 < 2 x 128
    assert rule.decide(obs(0, 1, b_simple=256.0)) == 2
    assert rule.decide(obs(3, 4, b_simple=1000.0)) == 4  # 1000 < 2 x 512
    assert rule.decide(obs(3, 4, b_simple=None)) == 4 and rule.decide(obs(3, 4, b_simple=math.inf)) == 4
    assert NoiseScaleRule(margin=1.0, growth=4).decide(obs(0, 2, b_simple=256.0)) == 8
    with pytest.raises(ValueError, match="Invalid margin"):
        NoiseScaleRule(margin=0.0)
    with pytest.raises(ValueError, match="Invalid growth"):
        NoiseScaleRule(growth=1)


def test_ramp_rule_follows_its_schedule():
    """The factor of the next epoch comes from the schedule, whatever was measured."""
    rule = RampRule({0: 1, 2: 2, 5: 8})
    assert [rule.decide(obs(e, 1)) for e in range(7)] == [1, 2, 2, 2, 8, 8, 8]
    assert rule.needs is None
    with pytest.raises(ValueError, match="start with"):
        RampRule({1: 2})
    with pytest.raises(ValueError, match="never decrease"):
        RampRule({0: 1, 2: 4, 3: 2})


def test_make_rule_by_name_and_errors():
    """Names give default rules; anything else is rejected with the list of names."""
    assert isinstance(make_rule("hessian"), HessianRule) and isinstance(make_rule("noise_scale"), NoiseScaleRule)
    ramp = RampRule({0: 1})
    assert make_rule(ramp) is ramp
    with pytest.raises(ValueError, match="Supported"):
        make_rule("linear")
    with pytest.raises(ValueError, match="Invalid eigenvalue_ratio"):
        HessianRule(eigenvalue_ratio=1.0)
    with pytest.raises(ValueError, match="Invalid duration"):
        HessianRule(duration=0)
