"""The large-batch study runner (benchmarks/study.py) and its report (benchmarks/report.py).

The plan and the report are checked with a synthetic runner whose accuracies are known in closed
form; one real run on a Fashion-MNIST subset checks the path through ``lbo compare``.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import report, study
from lightning_lbo.compare import RunResult, RunSpec, run_one


@pytest.fixture(autouse=True)
def _private_bench_lock(tmp_path, monkeypatch):
    """The study holds the machine-wide benchmark lock per run; tests must not wait for real benchmarks."""
    monkeypatch.setenv("LBO_BENCH_LOCK", str(tmp_path / "bench.lock"))
    monkeypatch.setenv("LBO_STUDY_CLAIMS", str(tmp_path))  # the runners' claims, outside the shared /tmp


def _fake_runner(calls: list[RunSpec], best_lr: float = 0.4):
    """Accuracy peaks at ``best_lr`` (per 256) in log space, 2% lower above batch 1000; K-FAC: 0.9 at any LR
    and batch, reached in a quarter of the steps."""

    def run(spec: RunSpec) -> RunResult:
        calls.append(spec)
        lr = spec.recipe_kwargs["base_lr"]
        acc = 0.9 - 0.01 * math.log2(lr / best_lr) ** 2 - 0.02 * (spec.batch_size > 1000)
        acc = (0.9 if spec.recipe == "kfac" else acc) + 0.001 * spec.seed
        steps = 40
        reach = 10 if spec.recipe == "kfac" else 30  # first step at the final accuracy
        history = [(s, s * 0.1, acc if s >= reach else acc - 0.1) for s in range(5, steps + 1, 5)]
        refreshes = {"done": 30, "possible": 100} if spec.recipe == "spngd" else {}
        return RunResult(spec.recipe, spec.batch_size, steps, acc, acc, None, None, 0.1, 100.0, 4.0, history,
                         test_acc=acc - 0.005, kfac_refreshes=refreshes, train_examples=1000)

    return run


def _config(tmp_path, **kw) -> study.StudyConfig:
    base = dict(recipes=("sgd",), batches=(100, 250), epochs=1, headline_model="", variants=(), val_size=200,
                train_subset=1200, results=tmp_path / "cache")
    return study.StudyConfig(**(base | kw))


def test_lr_grid_grows_toward_the_best_value_and_stops_at_five(tmp_path):
    """Centre 0.1, then 0.05 and 0.2; the best (0.2) on the edge adds 0.4, then 0.8; at most 5 values."""
    calls: list[RunSpec] = []
    config = _config(tmp_path, batches=(100,))
    study.run_study(config, runner=_fake_runner(calls), log=lambda _: None)
    grid = [c.recipe_kwargs["base_lr"] for c in calls if c.seed == 0]
    assert grid == [0.1, 0.05, 0.2, 0.4, 0.8]
    assert study.Tune(config.model, "sgd", 100, 1).best(study.Cache(config)) == 0.4
    assert [(c.recipe_kwargs["base_lr"], c.seed) for c in calls[5:]] == [(0.4, 1), (0.4, 2)]  # the best, 3 seeds
    assert all(c.val_size == 200 and c.test and c.train_subset == 1200 for c in calls)


def test_lr_grid_with_best_inside_stops_at_four(tmp_path):
    """The best value inside the grid: one more value on the better side, 4 in all."""
    calls: list[RunSpec] = []
    config = _config(tmp_path, batches=(100,))
    study.run_study(config, runner=_fake_runner(calls, best_lr=0.09), log=lambda _: None)
    assert [c.recipe_kwargs["base_lr"] for c in calls if c.seed == 0] == [0.1, 0.05, 0.2, 0.025]


def test_study_resumes_from_the_cache_and_retrains_changed_or_failed_runs(tmp_path):
    """A second invocation trains only what is missing; changed hyperparameters or a first failure retrain."""
    config = _config(tmp_path)
    first: list[RunSpec] = []
    assert study.run_study(config, max_runs=3, runner=_fake_runner(first), log=lambda _: None) == 3
    assert len(list(config.results.glob("*.json"))) == 3
    rest: list[RunSpec] = []
    study.run_study(config, runner=_fake_runner(rest), log=lambda _: None)
    done = {(s.recipe, s.batch_size, s.recipe_kwargs["base_lr"], s.seed) for s in first}
    assert not done & {(s.recipe, s.batch_size, s.recipe_kwargs["base_lr"], s.seed) for s in rest}
    assert study.next_cell(config, study.Cache(config)) is None
    again: list[RunSpec] = []
    assert study.run_study(config, runner=_fake_runner(again), log=lambda _: None) == 0 and not again

    path = config.results / "mlp-bn-sgd-b100-e1-lr0.1-s0.json"
    record = json.loads(path.read_text())
    record["hyperparameters"]["momentum"] = 0.5  # the recipe changed since: the run is stale
    path.write_text(json.dumps(record))
    cell = study.Cell("mlp-bn", "sgd", 100, 1, 0.1)
    assert study.Cache(config).get(cell) is None

    def crash(spec):
        raise RuntimeError("the training process died")

    study.train(cell, config, runner=crash)
    assert study.Cache(config).get(cell) is None  # a first failure is retried
    record = study.train(cell, config, runner=crash)
    assert record["attempts"] == 2 and study.Cache(config).get(cell)["result"]["error"].endswith("died")


def test_plan_order_baseline_then_every_recipe_then_seeds_then_ablations(tmp_path):
    """Breadth first: the scaling-rule LR of every recipe before any LR is halved; ablations at the best LR."""
    calls: list[RunSpec] = []
    config = _config(tmp_path, recipes=("sgd", "spngd"), batches=(100, 250), variants=("fresh",), top=1)
    study.run_study(config, runner=_fake_runner(calls), log=lambda _: None)
    first = [(c.recipe, c.batch_size, c.recipe_kwargs["base_lr"]) for c in calls[:4]]
    assert first == [("sgd", 100, 0.1), ("sgd", 250, 0.1), ("spngd", 250, 0.02), ("sgd", 100, 0.05)]
    first_seed = next(i for i, c in enumerate(calls) if c.seed)
    assert all(c.seed == 0 for c in calls[:first_seed]) and len({c.recipe_kwargs["base_lr"]
                                                                   for c in calls[:first_seed]}) >= 4
    variant = next(c for c in calls if c.recipe_kwargs.get("stale_threshold", 0.1) is None)
    cache = study.Cache(config)
    # spngd: 0.02, 0.01, 0.04, then outwards to 0.08 and 0.16 (5 values; the true optimum 0.4 lies beyond)
    assert variant.recipe_kwargs["base_lr"] == study.Tune("mlp-bn", "spngd", 250, 1).best(cache) == 0.16
    assert variant.seed == 0 and study.next_cell(config, cache) is None


def test_cli_accelerator_gpu_and_bad_arguments(tmp_path):
    """--accelerator gpu reaches every run's Trainer settings; bad recipes and batches fail up front."""
    args = study.build_parser().parse_args(["--accelerator", "gpu", "--threads", "0", "--batches", "128,2048",
                                            "--recipes", "sgd,kfac", "--results", str(tmp_path)])
    config = study.config_from_args(args)
    assert (config.accelerator, config.threads, config.batches, config.recipes) == ("gpu", 0, (128, 2048),
                                                                                     ("sgd", "kfac"))
    calls: list[RunSpec] = []
    study.train(study.Cell("mlp-bn", "sgd", 128, 1, 0.1), config, runner=_fake_runner(calls))
    assert calls[0].accelerator == "gpu"
    with pytest.raises(SystemExit, match="Unknown recipe"):
        study.config_from_args(study.build_parser().parse_args(["--recipes", "sgd,adam"]))
    with pytest.raises(SystemExit, match="exceed the 1000 training images"):
        study.config_from_args(study.build_parser().parse_args(["--train-subset", "6000", "--batches", "128,2048"]))
    with pytest.raises(SystemExit):
        study.build_parser().parse_args(["--until", "25:00"])


def test_report_goals_and_tables_from_a_synthetic_cache(tmp_path):
    """The report's figures: baseline band, gaps, steps-to-target ratio, SP-NGD's skipped refreshes."""
    config = _config(tmp_path, recipes=("sgd", "kfac", "spngd"), batches=(128, 2048, 8192), train_subset=0,
                     val_size=5000)
    study.run_study(config, runner=_fake_runner([]), log=lambda _: None)
    text = report.write_report(config)
    # baseline sgd@128 at LR 0.4: held-out 0.9 (+0.001/seed), test 0.895, 0.896, 0.897 over seeds 0-2
    assert "Test accuracy at the chosen LR: 0.8960 ± 0.0010 (n=3)." in text
    # batch 2048: K-FAC 0.9 held-out at its centre LR 0.02 (all tie), test 0.895-0.897 over 3 seeds: gap 0
    assert ("| 1. MLP-BN: best recipe at 2048 within 0.3% of the baseline (3 seeds) | kfac 0.8960 ± 0.0010 (n=3) "
            "vs sgd@128 0.8960 ± 0.0010 (n=3): gap +0.0000 | **met** |") in text
    # target 0.9 - 0.005: K-FAC at step 10, sgd at 2048 (0.88) never in its 40 steps: ratio < 0.25
    assert "| K-FAC 10 steps; no first-order recipe in 40 (ratio < 0.25) | **met** |" in text
    # 8192: the best is K-FAC again; SP-NGD's grid ends at 0.16 (0.8625 held-out, test 0.8575-0.8595), 70% skipped
    assert ("| 3. gap of the best recipe at 8192 (goal <= 1%) | kfac 0.8960 ± 0.0010 (n=3): gap +0.0000 "
            "| **met** |") in text
    assert ("| 4. spngd (LR 0.16) within 0.3% of K-FAC at 8192, >= 60% refreshes skipped | 0.8585 ± 0.0010 (n=3) vs "
            "0.8960 ± 0.0010 (n=3) (gap +0.0375); skipped 70% | **not met** |") in text
    assert "**Status: complete.**" in text
    assert report.plot_error_vs_batch(report.collect(study.Cache(config), "mlp-bn", 1), config, None,
                                      tmp_path / "e.png").stat().st_size > 0


def test_one_real_run_holds_out_validation_and_measures_test(tmp_path):
    """Through lbo compare's run_one: 1000 training images (200 held out), 10 steps, test accuracy measured."""
    config = _config(tmp_path)
    record = study.train(study.Cell("mlp-bn", "sgd", 100, 1, 0.1), config, runner=run_one)
    result = record["result"]
    assert result["error"] == "" and result["steps"] == 10 and result["train_examples"] == 1000
    assert 0.2 < result["final_acc"] <= 1 and 0.2 < result["test_acc"] <= 1  # chance: 0.1
    assert [h[0] for h in result["history"]] == [2, 4, 6, 8, 10]  # every 10 // 4 steps


def test_step_race_against_the_fastest_first_order_recipe():
    """Goal 2 compares K-FAC with whichever first-order recipe reaches the target in the fewest steps."""

    def chosen(name: str, history: list) -> report.Chosen:
        run = {"result": {"history": history, "steps": history[-1][0]}}
        return report.Chosen("mlp-bn", name, 2048, 0.1, {0.1: history[-1][2]}, [run])

    kfac = chosen("kfac", [(25, 1.0, 0.86), (50, 2.0, 0.885), (260, 9.0, 0.889)])
    lars = chosen("lars", [(50, 1.0, 0.80), (150, 3.0, 0.885), (260, 5.0, 0.893)])
    sgd = chosen("sgd", [(50, 1.0, 0.80), (200, 3.0, 0.885), (260, 5.0, 0.89)])
    assert report._step_race(kfac, [sgd, lars], 0.88) == ("K-FAC 50 vs lars 150 steps = 0.33", "**met**")
    assert report._step_race(kfac, [sgd, lars], 0.893) == ("K-FAC never reached 0.8930", "**not met**")
    assert report._step_race(kfac, [sgd], 0.893) == ("K-FAC never reached 0.8930",
                                                     "undecided (no recipe at this batch reached it)")
    assert report._step_race(lars, [sgd], 0.893) == ("K-FAC 260 steps; no first-order recipe in 260 (ratio < 1.00)",
                                                     "not decided")


def test_study_recipe_kwargs_are_frozen_against_changed_recipe_defaults(tmp_path, monkeypatch):
    """A recipe default moved after the cache was written (here sgd's base_lr and momentum) moves neither the
    grid centre nor the cached run: the study passes every recipe argument explicitly."""
    import inspect

    from lightning_lbo import recipes

    for name, kwargs in study.STUDY_RECIPE_KWARGS.items():  # every frozen argument is one the recipe takes
        assert set(kwargs) <= set(inspect.signature(recipes.RECIPES[name]).parameters), name
    config = _config(tmp_path, batches=(100,))
    study.run_study(config, max_runs=1, runner=_fake_runner([]), log=lambda _: None)
    cell = study.Cell("mlp-bn", "sgd", 100, 1, 0.1)
    assert study.Cache(config).get(cell) is not None

    original = recipes.RECIPES["sgd"]

    def moved_defaults(global_batch_size, epochs, steps_per_epoch, base_lr=0.4, momentum=0.8, **kw):
        return original(global_batch_size, epochs, steps_per_epoch, base_lr=base_lr, momentum=momentum, **kw)

    monkeypatch.setitem(recipes.RECIPES, "sgd", moved_defaults)
    assert study.Cache(config).get(cell) is not None  # still the same hyperparameters: reused
    assert study.Tune("mlp-bn", "sgd", 100, 1).centre == 0.1
    assert study.next_cell(config, study.Cache(config)).base_lr == 0.05  # the grid goes on around 0.1


def test_two_runners_train_disjoint_cells_and_take_over_a_dead_runners_claim(tmp_path):
    """A cell claimed by a live runner is skipped; a claim whose process died is taken over."""
    import os
    import subprocess
    import sys
    import time

    config = _config(tmp_path)  # the plan starts with sgd at batch 100, then at 250
    first = study.next_cell(config, study.Cache(config))
    held = study.claim(config, first)
    assert held is not None and study.claim(config, first) is None  # taken (by this live process)
    held.write_text(str(os.getppid()))  # a live process other than this one
    calls: list[RunSpec] = []
    study.run_study(config, max_runs=1, until=time.time() + 60, runner=_fake_runner(calls), log=lambda _: None)
    assert [(c.batch_size, c.recipe_kwargs["base_lr"]) for c in calls] == [(250, 0.1)]  # not the claimed cell
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held.write_text(dead.stdout.strip())
    again: list[RunSpec] = []
    study.run_study(config, max_runs=1, until=time.time() + 60, runner=_fake_runner(again), log=lambda _: None)
    assert [(c.batch_size, c.recipe_kwargs["base_lr"]) for c in again] == [(100, 0.1)] and not held.exists()


def test_headline_model_gets_a_short_grid_then_three_seeds_at_its_best_lr(tmp_path):
    """The second model's cells: centre, half, double (3 LRs), then seeds 1 and 2 at the best of them."""
    calls: list[RunSpec] = []
    config = _config(tmp_path, headline_model="cnn", headline_recipes=("sgd",), headline_epochs=1)
    study.run_study(config, runner=_fake_runner(calls), log=lambda _: None)
    cnn = [(c.batch_size, c.recipe_kwargs["base_lr"], c.seed) for c in calls if c.model == "cnn"]
    assert cnn == [(100, 0.1, 0), (250, 0.1, 0), (100, 0.05, 0), (100, 0.2, 0), (250, 0.05, 0), (250, 0.2, 0),
                   (100, 0.2, 1), (100, 0.2, 2), (250, 0.2, 1), (250, 0.2, 2)]  # the fake optimum is 0.4


def test_seed_variants_rerun_the_variant_at_its_parents_best_lr_with_seeds_1_and_2(tmp_path):
    """--seed-variants: the variant's seed-0 cell, then seeds 1 and 2 at the same LR; other variants: seed 0 only."""
    calls: list[RunSpec] = []
    config = _config(tmp_path, recipes=("sgd", "spngd"), variants=("fresh", "poly2"), seed_variants=("fresh",))
    study.run_study(config, runner=_fake_runner(calls), log=lambda _: None)
    fresh = [(c.recipe_kwargs["base_lr"], c.seed) for c in calls if c.recipe_kwargs.get("stale_threshold", 1) is None]
    poly2 = [c.seed for c in calls if c.recipe_kwargs.get("power") == 2.0 and c.recipe == "spngd"]
    assert fresh == [(0.16, 0), (0.16, 1), (0.16, 2)] and poly2 == [0]
    with pytest.raises(SystemExit, match="Unknown variant"):
        study.config_from_args(study.build_parser().parse_args(["--seed-variants", "nope"]))


def test_report_smallcnn_goal_from_its_grid_and_seeds(tmp_path):
    """Goal 1's SmallCNN row: the held-out-chosen recipe at 2048 (mean of 3 seeds) against the CNN baseline."""
    config = _config(tmp_path, recipes=("sgd", "kfac"), batches=(128, 2048), train_subset=0, val_size=5000,
                     headline_model="cnn", headline_recipes=("sgd", "kfac"), headline_epochs=4)
    study.run_study(config, runner=_fake_runner([]), log=lambda _: None)
    text = report.write_report(config)
    # cnn sgd@128: grid 0.05/0.1/0.2 (0.2 best: held-out 0.89, test 0.885-0.887); kfac@2048 test 0.895-0.897
    assert ("| 1. SmallCNN (4 epochs, 3 LR value(s) tried) | kfac 0.8960 ± 0.0010 (n=3) vs sgd@128 "
            "0.8860 ± 0.0010 (n=3): gap -0.0100 | **met** |") in text
    assert "| sgd | 128 | 0.05: 0.8100, 0.1: 0.8600, **0.2: 0.8900** | 0.8860 ± 0.0010 (n=3) |" in text


def test_report_moves_superseded_notes_to_a_history_section_at_the_end(tmp_path, monkeypatch):
    """The notes' "### History" part leaves the current reading and closes the report; the rest stays in place."""
    config = _config(tmp_path, recipes=("sgd",), batches=(128,), train_subset=0, val_size=5000)
    study.run_study(config, runner=_fake_runner([]), log=lambda _: None)
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading\n\ncurrent text\n\n### History (old)\n\n- superseded text\n")
    monkeypatch.setattr(report, "NOTES", notes)
    monkeypatch.setattr(report, "RESULTS", config.results)
    text = report.write_report(config)
    assert text.index("current text") < text.index("## Curves") < text.index("## History (old)") \
        < text.index("superseded text")
    assert "### History" not in text
