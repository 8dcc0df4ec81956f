"""benchmarks/time_to_target.py: the first crossing, the interleaved order, the plan from study v2's cache, the
records and the analysis (with a fake trainer), and the ``kfac`` recipe's refresh-interval arguments."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import study_v2 as s2
from benchmarks import time_to_target as ttt


def test_time_to_target_first_at_target_is_the_first_crossing():
    history = [(9, 1.0, 0.80), (18, 2.0, 0.86), (27, 3.5, 0.85), (36, 4.0, 0.90)]
    assert ttt.first_at_target(history, 0.86) == (18, 2.0)  # reached exactly counts; later dips do not matter
    assert ttt.first_at_target(history, 0.90) == (36, 4.0)
    assert ttt.first_at_target(history, 0.95) is None
    assert ttt.first_at_target([(9, 1.0, math.nan), (18, 2.0, 0.9)], 0.5) == (18, 2.0)
    assert ttt.first_at_target([], 0.1) is None


def test_time_to_target_eval_every_is_a_third_of_an_epoch():
    assert ttt.eval_every(2048) == 9  # 27 steps per epoch
    assert ttt.eval_every(128) == 144  # ceil(430 / 3)


def test_time_to_target_schedule_rotates_the_arms_every_round():
    order = ttt.schedule(("mlp-bn", "cnn"), (0, 1), ("a", "b", "c"))
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert [[arm for _, arm, _ in r] for r in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                          ["a", "b", "c"]]
    assert [(m, s) for m, _, s in order[::3]] == [("mlp-bn", 0), ("cnn", 0), ("mlp-bn", 1), ("cnn", 1)]
    full = ttt.schedule()
    assert len(full) == len(ttt.MODELS) * len(ttt.SEEDS) * len(ttt.ARMS) and len(set(full)) == len(full)


def _write_study(cache_dir, model, recipe, batch, lr, seed, held_out):
    cell = s2.Cell(model, recipe, batch, s2.EPOCHS, lr, seed)
    record = {"cell": cell.__dict__, "protocol": s2.PROTOCOL, "recipe_kwargs": cell.recipe_kwargs(),
              "result": {"final_acc": held_out, "test_acc": 0.9, "history": []}}
    (cache_dir / f"{cell.key}.json").write_text(json.dumps(record))


def _complete_study(cache_dir, model="mlp-bn"):
    """Baseline: 5 seeds at 0.2 with held-out 0.90..0.904; 2048 grids with interior best LRs."""
    for lr, acc in ((0.1, 0.85), (0.2, 0.88), (0.4, 0.86)):
        _write_study(cache_dir, model, "sgd", 128, lr, 0, acc)
    for seed in range(5):
        _write_study(cache_dir, model, "sgd", 128, 0.2, seed, 0.900 + 0.001 * seed)
    for recipe, centre in (("sgd", 0.05), ("lars", 0.2), ("kfac", 0.04)):
        for factor, acc in ((0.5, 0.85), (1.0, 0.88), (2.0, 0.86)):
            _write_study(cache_dir, model, recipe, 2048, centre * factor, 0, acc)


def test_time_to_target_plan_takes_study_v2_lrs_and_baseline_target(tmp_path):
    _complete_study(tmp_path)
    runs = ttt.plan_runs(s2.Cache(tmp_path), ("mlp-bn",), (0,))
    assert [r.arm for r in runs] == list(ttt.ARMS)
    assert {r.arm: r.base_lr for r in runs} == {"kfac-every-step": 0.04, "kfac-amortised": 0.04, "sgd": 0.05,
                                                "lars": 0.2}
    assert all(r.target == pytest.approx(0.902 - 0.005, abs=1e-12) for r in runs)
    every, amortised = runs[0].recipe_kwargs(), runs[1].recipe_kwargs()
    assert (every["factor_update_interval"], every["inverse_update_interval"]) == (1, 1)
    assert (amortised["factor_update_interval"], amortised["inverse_update_interval"]) == (10, 10)
    base = s2.Cell("mlp-bn", "kfac", 2048, s2.EPOCHS, 0.04).recipe_kwargs()  # otherwise study v2's arguments
    assert {k: v for k, v in amortised.items() if "interval" not in k} == base
    assert "factor_update_interval" not in runs[2].recipe_kwargs()


def test_time_to_target_plan_refuses_an_incomplete_study(tmp_path):
    lrs = {"kfac": 0.04, "sgd": 0.05, "lars": 0.2}
    with pytest.raises(ValueError, match="baseline.*--target"):
        ttt.plan_runs(s2.Cache(tmp_path), ("mlp-bn",), (0,), lrs=lrs)
    _write_study(tmp_path, "mlp-bn", "sgd", 128, 0.2, 0, 0.9)  # one seed: still incomplete
    with pytest.raises(ValueError, match="baseline"):
        ttt.plan_runs(s2.Cache(tmp_path), ("mlp-bn",), (0,), lrs=lrs)
    with pytest.raises(ValueError, match="LR grid of kfac.*--lr"):
        ttt.plan_runs(s2.Cache(tmp_path), ("mlp-bn",), (0,), target=0.5)


def _fake_runner(seconds_per_step):
    """A trainer whose history crosses 0.86 at step 36 for kfac and 72 otherwise, at the given s/step."""
    from lightning_lbo.compare import RunResult

    def run(spec):
        assert spec.eval_every == 9 and spec.batch_size == 2048 and spec.threads == 1
        assert spec.module_kwargs["target"] == 0.85 and spec.module.endswith("time_to_target:TimeToTargetClassifier")
        if spec.recipe == "kfac":
            every = spec.recipe_kwargs["factor_update_interval"] == 1
            per_step, cross = seconds_per_step["every" if every else "kfac"], 36
        else:
            per_step, cross = seconds_per_step[spec.recipe], 72
        history = [(s, s * per_step, 0.80 if s < cross else 0.86) for s in range(9, 109, 9)]
        return RunResult(spec.recipe, spec.batch_size, 108, 0.86, 0.86, None, None, per_step, 0.0, history=history)

    return run


def test_time_to_target_run_all_caches_and_analyse_computes_ratios(tmp_path, monkeypatch):
    import contextlib
    import dataclasses

    import benchmarks.bench_lock as lock

    taken = []
    monkeypatch.setattr(lock, "bench_lock", lambda **kw: taken.append(kw) or contextlib.nullcontext())
    fake = _fake_runner({"every": 3.0, "kfac": 1.0, "sgd": 0.6, "lars": 0.5})
    runs = ttt.plan_runs(s2.Cache(tmp_path), ("mlp-bn",), (0, 1), target=0.85,
                         lrs={"kfac": 0.04, "sgd": 0.05, "lars": 0.2})
    assert ttt.run_all(runs, tmp_path, log=lambda m: None, runner=fake) == 8
    assert ttt.run_all(runs, tmp_path, log=lambda m: None, runner=fake) == 0  # all cached
    assert taken == [{"exclusive": True}] * 8  # a timed run has the machine's benchmark slots to itself
    record = ttt.Records(tmp_path).get(runs[0])
    assert record["steps_to_target"] == 36 and record["seconds_to_target"] == pytest.approx(108.0)
    # kfac every step 36 x 3.0 = 108 s, amortised 36 s; sgd 72 x 0.6 = 43.2 s, lars 36 s (the best first-order)
    text = ttt.analyse(tmp_path, runs)
    assert "best first-order: lars" in text
    assert "kfac-every-step: time ratio 3.00 (goal <= 0.7: MISSED), step ratio 0.50" in text
    assert "kfac-amortised: time ratio 1.00 (goal <= 0.7: MISSED), step ratio 0.50" in text
    assert "faster K-FAC refresh schedule: kfac-amortised" in text
    other_target = [dataclasses.replace(r, target=0.9) for r in runs]
    assert ttt.Records(tmp_path).get(other_target[0]) is None  # another target is another protocol


def test_time_to_target_compare_arms_goal_and_unreached_arms():
    s = ttt.ArmSummary
    arms = {"sgd": s({0: 10.0, 1: 12.0}, {0: 100, 1: 120}, 0.1), "lars": s({0: 8.0, 1: None}, {0: 80, 1: None}, 0.1),
            "kfac-every-step": s({0: 7.0, 1: 8.0}, {0: 20, 1: 22}, 0.35),
            "kfac-amortised": s({0: 7.2, 1: 7.9}, {0: 20, 1: 22}, 0.36)}
    out = ttt.compare_arms(arms)
    assert out["best_first_order"] == "sgd"  # lars missed the target on seed 1
    assert out["kfac"]["kfac-every-step"]["time_ratio"] == pytest.approx(7.5 / 11.0)
    assert out["kfac"]["kfac-every-step"]["goal_met"]
    assert out["kfac"]["kfac-every-step"]["per_seed_time_ratio"] == {0: pytest.approx(0.7), 1: pytest.approx(8 / 12)}
    assert out["faster_schedule"] == "tie"  # medians 7.5 and 7.55: within 5%
    arms["kfac-amortised"] = s({0: None, 1: 7.0}, {0: None, 1: 20}, 0.3)
    out = ttt.compare_arms(arms)
    assert not out["kfac"]["kfac-amortised"]["goal_met"] and out["kfac"]["kfac-amortised"]["time_ratio"] == math.inf
    assert out["faster_schedule"] == "kfac-every-step"


def test_time_to_target_cli_refuses_protocol_changes_outside_smoke():
    with pytest.raises(SystemExit, match="--smoke runs only"):
        ttt.main(["--target", "0.5"])


def test_kfac_recipe_refresh_intervals_reach_the_optimizer():
    from torch import nn

    from lightning_lbo.recipes import build_recipe

    recipe = build_recipe("kfac", global_batch_size=2048, epochs=2, steps_per_epoch=10, factor_update_interval=10,
                          inverse_update_interval=5)
    assert recipe.hyperparameters["factor_update_interval"] == 10
    opt = recipe.optimizer(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    assert (opt.preconditioner.schedule.factor_update_interval, opt.preconditioner.schedule.inverse_update_interval) \
        == (10, 5)
    default = build_recipe("kfac", global_batch_size=2048, epochs=2, steps_per_epoch=10).optimizer(nn.Linear(3, 2))
    assert default.preconditioner.schedule.factor_update_interval == 1
    with pytest.raises(ValueError, match="factor_update_interval"):
        build_recipe("kfac", global_batch_size=2048, epochs=2, steps_per_epoch=10, factor_update_interval=0)


def test_time_to_target_classifier_stops_at_the_first_evaluation_at_target(tmp_path):
    """A real (short) MLP-BN run at 2048 stops at the first held-out evaluation at or above the target: 9 steps
    (a third of an epoch) for a target below what one such evaluation reaches, not the 3 epochs it was given."""
    import os

    from lightning_lbo.compare import RunSpec, run_one
    from lightning_lbo.data import locate_fashion_mnist

    try:
        locate_fashion_mnist(os.environ.get("LBO_DATA_DIR"))
    except Exception:  # noqa: BLE001 - the real data is needed
        pytest.skip("Fashion-MNIST not found (make data)")
    run = ttt.Run("mlp-bn", "sgd", 0, 0.05, 0.6, epochs=3)
    spec = RunSpec("sgd", 2048, 3, recipe_kwargs=run.recipe_kwargs(),
                   module="benchmarks.time_to_target:TimeToTargetClassifier",
                   module_kwargs=dict(target=run.target, model_name="mlp-bn", virtual_batch_size=128,
                                      precise_batches=5, metrics_path=str(tmp_path / "m.json")),
                   datamodule="benchmarks.study_v2:StudyDataModule", datamodule_kwargs=dict(shuffle_seed=0),
                   seed=0, eval_every=ttt.eval_every(2048), threads=1, progress=False)
    result = run_one(spec)
    assert result.history[0][2] >= 0.6 and ttt.first_at_target(result.history, 0.6) == (9, result.history[0][1])
    assert result.steps == 9 and len(result.history) == 1
