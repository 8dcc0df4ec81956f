"""Critical-batch advisor: the recommendation rule, the window estimate, the target, and `lbo advise` on real data."""

from __future__ import annotations

import json
import math

import pytest

from lightning_lbo.critical_batch import Advice, check_arguments, recommend, target_reached, window_b_simple


def test_recommend_rounds_to_a_power_of_two_and_scales_the_lr():
    """Nearest power of two in log scale, capped; LR by the linear or square-root rule."""
    assert recommend(700.0, 128, 0.1) == (512, pytest.approx(0.4))
    assert recommend(760.0, 128, 0.1) == (1024, pytest.approx(0.8))  # log2(760) = 9.57
    assert recommend(3000.0, 128, 0.1, scaling="sqrt", max_batch=1024) == (1024, pytest.approx(0.1 * math.sqrt(8)))
    assert recommend(40.0, 128, 0.1) == (32, pytest.approx(0.025))
    with pytest.raises(ValueError, match="did not settle"):
        recommend(-5.0, 128, 0.1)
    with pytest.raises(ValueError, match="Invalid scaling"):
        recommend(100.0, 128, 0.1, scaling="cubic")


def test_window_b_simple_is_the_ratio_of_window_means_of_the_last_steps():
    """Only rows within the window count, and the terms are averaged before the ratio is taken."""
    # (step, batch, b_simple, grad_sq, trace): early rows have B_simple 10, the last three 100, 400, 50.
    history = [(0, 128, 10.0, 10.0, 100.0), (50, 128, 10.0, 10.0, 100.0), (100, 128, 10.0, 10.0, 100.0),
               (150, 128, 100.0, 2.0, 200.0), (200, 128, 400.0, 1.0, 400.0), (250, 128, 50.0, 4.0, 200.0)]
    b_simple, start = window_b_simple(history, window=101)  # steps > 149: the last three rows
    assert start == 150
    assert b_simple == pytest.approx((200 + 400 + 200) / 3 / ((2 + 1 + 4) / 3))  # 114.3, not the mean ratio 183
    assert window_b_simple(history, window=1) == (pytest.approx(50.0), 250)
    assert window_b_simple(history, window=1000) == (pytest.approx(1100 / 37), 0)  # the whole run
    with pytest.raises(ValueError, match="No noise-scale estimate"):
        window_b_simple([], window=10)


def test_target_reached_from_below_for_accuracy_and_from_above_for_loss():
    """val_acc reaches a target by rising to it, val_loss by falling to it."""
    assert target_reached(0.85, 0.85, "val_acc") and not target_reached(0.849, 0.85, "val_acc")
    assert target_reached(0.30, 0.31, "val_loss") and not target_reached(0.32, 0.31, "val_loss")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window": 8}, "2 x probe_every_n_steps = 10"),
    ({"window": 400}, "longer than the step budget"),
    ({"monitor": "train_acc"}, "Invalid monitor: 'train_acc'. Supported"),
    ({"target": 85.0}, "fraction in"),
    ({"target": -1.0, "monitor": "val_loss"}, "positive loss"),
    ({"target": 0.85, "val_size": 0}, "use val_size >= 1"),
    ({"steps": 0}, "Invalid steps"),
    ({"batch_size": 12.5}, "Invalid batch_size"),
    ({"lr": 0.0}, "Invalid lr"),
    ({"max_batch": 0}, "Invalid max_batch"),
])
def test_check_arguments_rejects_bad_input_naming_the_fix(kwargs, match):
    """Each bad argument is rejected before training, with what to use instead."""
    args = {"batch_size": 128, "lr": 0.1, "steps": 300, "window": 100, "probe_every_n_steps": 5, "max_batch": None,
            "target": None, "monitor": "val_acc", "val_every_n_steps": 50, "val_size": 5000} | kwargs
    with pytest.raises(ValueError, match=match):
        check_arguments(**args)


def test_advice_says_where_in_training_the_estimate_holds():
    """Reached target, missed target (with the best value and the fix) and no target read differently."""
    base = {"b_simple": 300.0, "batch_size": 128, "lr": 0.1, "recommended_batch": 256, "recommended_lr": 0.2,
            "scaling": "linear", "steps": 700, "window_start": 605,
            "history": [(s, 128.0, 50.0 + s, 1.0, 50.0 + s) for s in range(0, 700, 5)]}
    reached = Advice(**base, target=0.85, target_step=700, validation=[(650, 0.84), (700, 0.86)])
    assert "val_acc reached 0.85 at step 700" in reached.summary()
    assert "B_simple over steps 605-700 at batch 128): 300" in reached.summary()
    assert "695: 745" in reached.summary()  # the trace ends with the last estimate
    missed = Advice(**base, target=0.9, validation=[(650, 0.84), (700, 0.86)])
    assert "did not reach 0.9 within 700 steps (best 0.86)" in missed.summary()
    assert "raise the step budget" in missed.where()
    lost = Advice(**base, target=0.3, monitor="val_loss", validation=[(650, 0.42), (700, 0.37)])
    assert "best 0.37" in lost.where()
    assert "no target given" in Advice(**base).where()


def test_lbo_advise_trains_briefly_and_writes_advice(tmp_path, capsys):
    """`lbo advise` on 1024 images: prints the estimate and recommendation, JSON and plot agree with it."""
    from lightning_lbo.cli import main

    out_json, out_png = tmp_path / "advice.json", tmp_path / "b_simple.png"
    code = main(["advise", "--model", "mlp", "--batch-size", "32", "--steps", "30", "--probe-every", "3",
                 "--window", "12", "--train-subset", "1024", "--threads", "1", "--json", str(out_json),
                 "--plot", str(out_png)])
    assert code == 0
    advice = json.loads(out_json.read_text())
    printed = capsys.readouterr().out
    assert f"recommended global batch: {advice['recommended_batch']}" in printed and "no target given" in printed
    assert advice["steps"] == 30 and len(advice["history"]) == 10  # logged at every probe: steps 0, 3, ..., 27
    assert advice["window_start"] == 18  # estimates at 18, 21, 24, 27: the last 12 steps
    assert advice["b_simple"] == pytest.approx(window_b_simple([tuple(r) for r in advice["history"]], 12)[0])
    assert advice["recommended_batch"] == recommend(advice["b_simple"], 32, 0.1)[0]
    assert out_png.stat().st_size > 1000
    assert main(["advise", "--steps", "1"]) == 2  # shorter than the window: exit code 2 with the reason
    assert "use window <= steps" in capsys.readouterr().err


def test_lbo_advise_stops_at_the_target_and_estimates_just_before_it(tmp_path, capsys):
    """With --target the run stops at the first validation that reaches it; the window ends there."""
    from lightning_lbo.cli import main

    out_json = tmp_path / "advice.json"
    code = main(["advise", "--model", "mlp", "--batch-size", "32", "--steps", "200", "--probe-every", "3",
                 "--window", "30", "--target", "0.6", "--val-every", "20", "--val-size", "512",
                 "--train-subset", "2048", "--threads", "1", "--json", str(out_json)])
    assert code == 0
    advice = json.loads(out_json.read_text())
    values = [v for _, v in advice["validation"]]
    assert values[-1] >= 0.6 and all(v < 0.6 for v in values[:-1])  # stopped at the first that reached it
    assert advice["target_step"] == advice["steps"] == advice["validation"][-1][0] < 200
    assert advice["history"][-1][0] > advice["steps"] - 3 - 1  # trained and estimated up to the target
    assert advice["window_start"] > advice["steps"] - 30
    assert f"val_acc reached 0.6 at step {advice['steps']}" in capsys.readouterr().out
