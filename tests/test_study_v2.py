"""Pure parts of benchmarks/study_v2.py: epoch accounting, the LR grid rule, the criterion, the plan."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from benchmarks import study_v2 as s2


def test_study_v2_epoch_accounting_sees_every_example_once_per_epoch():
    assert s2.TRAIN_IMAGES == 55000
    for batch in (128, 512, 2048, 8192):
        sizes = s2.epoch_batch_sizes(batch)
        assert sum(sizes) == 55000 and len(sizes) == s2.steps_per_epoch(batch)
        assert max(sizes) == batch and min(sizes) >= 1
    assert s2.steps_per_epoch(2048) == 27 and s2.epoch_batch_sizes(2048)[-1] == 55000 - 26 * 2048
    assert s2.EPOCHS * s2.steps_per_epoch(2048) == 810
    assert s2.steps_per_epoch(128) == 430 and s2.steps_per_epoch(8192) == 7
    assert s2.epoch_batch_sizes(1000) == [1000] * 55
    assert [s2.precise_batches(b) for b in (128, 512, 2048, 8192)] == [80, 20, 5, 2]


def _grow(score, centre, cap=s2.MAX_LRS):
    tried = {}
    order = []
    while (lr := s2.next_lr(tried, centre)) is not None:
        assert lr not in tried
        tried[lr] = score(lr)
        order.append(lr)
        assert len(tried) <= cap
    return tried, order


def test_study_v2_next_lr_grows_the_grid_until_the_best_is_interior():
    peak = 0.8  # accuracy falls with the log-distance from 0.8
    tried, order = _grow(lambda lr: 0.9 - 0.01 * abs(math.log2(lr / peak)), centre=0.1)
    assert order == [0.1, 0.05, 0.2, 0.4, 0.8, 1.6]  # centre, half, double, then outwards on the best's side
    assert s2.best_lr(tried, 0.1) == 0.8 and s2.is_interior(tried, 0.1) and s2.grid_complete(tried, 0.1)
    tried, order = _grow(lambda lr: 0.9 - 0.01 * abs(math.log2(lr / 0.1)), centre=0.1)
    assert order == [0.1, 0.05, 0.2]  # the centre is best: interior after three
    tried, order = _grow(lambda lr: 0.9 - 0.01 * abs(math.log2(lr / 0.0125)), centre=0.1)
    assert order == [0.1, 0.05, 0.2, 0.025, 0.0125, 0.00625]


def test_study_v2_next_lr_stops_at_the_cap_on_a_monotone_score():
    tried, order = _grow(lambda lr: lr, centre=1.0)
    assert len(order) == s2.MAX_LRS and s2.best_lr(tried, 1.0) == max(order)
    assert not s2.is_interior(tried, 1.0) and s2.grid_complete(tried, 1.0)
    assert s2.next_lr({0.1: 0.5}, 0.1, budget=1) is None  # a round-robin budget
    assert s2.next_lr({0.1: 0.5}, 0.1, budget=3) == 0.05


def test_study_v2_best_lr_ties_go_to_the_centre_then_the_smaller_lr():
    assert s2.best_lr({0.05: 0.9, 0.1: 0.9, 0.2: 0.9}, 0.1) == 0.1
    assert s2.best_lr({0.05: 0.9, 0.2: 0.9, 0.1: 0.8}, 0.1) == 0.05
    assert s2.best_lr({}, 0.1) is None


@pytest.mark.parametrize("p, df, table", [(0.95, 1, 6.3138), (0.95, 4, 2.1318), (0.95, 8, 1.8595),
                                          (0.975, 10, 2.2281), (0.95, 30, 1.6973), (0.99, 5, 3.3649)])
def test_study_v2_t_quantile_matches_the_tables(p, df, table):
    assert s2.t_quantile(p, df) == pytest.approx(table, abs=1e-4)
    assert s2.t_cdf(s2.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_study_v2_t_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="0 < p < 1"):
        s2.t_quantile(1.0, 4)


def test_study_v2_gap_verdict_is_welchs_one_sided_bound():
    baseline = [0.900, 0.902, 0.904, 0.906, 0.908]
    recipe = [0.897, 0.899, 0.901, 0.903, 0.905]  # same spread: Welch's df is 2 (n - 1) = 8
    v = s2.gap_verdict(baseline, recipe)
    gap = 100 * (statistics.mean(baseline) - statistics.mean(recipe))
    se = math.sqrt(2 * (100 * statistics.stdev(baseline)) ** 2 / 5)
    assert v.gap == pytest.approx(gap) and v.gap == pytest.approx(0.3)
    assert v.df == pytest.approx(8.0)
    assert v.upper == pytest.approx(gap + 1.859548 * se, abs=1e-5)
    assert v.margin_ok and v.upper == pytest.approx(0.3 + 1.859548 * 0.2, abs=1e-5) and not v.bound_ok
    assert not v.holds
    tight = s2.gap_verdict([0.9001, 0.9000, 0.9002], [0.8990, 0.8991, 0.8992])
    assert tight.margin_ok and tight.bound_ok and tight.holds
    worse = s2.gap_verdict([0.90, 0.901], [0.895, 0.896])
    assert worse.gap == pytest.approx(0.5) and not worse.margin_ok
    assert s2.gap_verdict([0.9, 0.91], [0.895, 0.9], margin=s2.GOAL_8192_MARGIN).margin_ok  # the 8192 goal
    with pytest.raises(ValueError, match="at least 2 seeds"):
        s2.gap_verdict([0.9], [0.9, 0.9])


def test_study_v2_convergence_check():
    assert s2.converged([0.900, 0.902], [0.901, 0.903])  # +0.1 points
    assert s2.converged([0.900, 0.902], [0.9015, 0.9035])  # +0.15 points: allowed
    assert not s2.converged([0.900, 0.902], [0.902, 0.904])  # +0.2 points


def _write(cache_dir, cell, held_out, test=0.9):
    record = {"cell": cell.__dict__, "protocol": s2.PROTOCOL, "recipe_kwargs": cell.recipe_kwargs(),
              "result": {"final_acc": held_out, "test_acc": test, "history": []}}
    (cache_dir / f"{cell.key}.json").write_text(json.dumps(record))


def test_study_v2_plan_starts_with_the_baseline_and_2048_grids_and_skips_kfac_until_consistent(tmp_path):
    config = s2.Config(models=("mlp-bn",), results=tmp_path)
    cache = s2.Cache(tmp_path)
    cell, waiting = s2.next_cell(config, cache)
    assert cell.key == "mlp-bn-sgd-b128-e30-ghost128-lr0.2-s0"
    first = [c.key for c in s2.plan(config, cache)][:5]
    assert first == ["mlp-bn-sgd-b128-e30-ghost128-lr0.2-s0", "mlp-bn-sgd-b2048-e30-ghost128-lr0.05-s0",
                     "mlp-bn-lars-b2048-e30-ghost128-lr0.2-s0", "mlp-bn-kfac-b2048-e30-ghost128-lr0.04-s0",
                     "mlp-bn-spngd-b2048-e30-ghost128-lr0.01-s0"]
    for key in first[:3]:
        _write(tmp_path, s2.Cell(*_parse(key)), 0.9)
    cache.reload()
    cell, waiting = s2.next_cell(config, cache)
    assert [c.recipe for c in waiting] == ["kfac", "spngd"] and cell.key == "mlp-bn-sgd-b128-e30-ghost128-lr0.1-s0"
    consistent = s2.Config(models=("mlp-bn",), results=tmp_path, kfac_ghost_consistent=True)
    assert s2.next_cell(consistent, cache)[0].key == "mlp-bn-kfac-b2048-e30-ghost128-lr0.04-s0"
    with pytest.raises(ValueError, match="--kfac-ghost-consistent"):
        s2.train(s2.Cell("mlp-bn", "kfac", 2048, 30, 0.04), config)
    # a record of another protocol is not reused
    stale = json.loads((tmp_path / f"{first[0]}.json").read_text())
    stale["protocol"] = {**s2.PROTOCOL, "virtual_batch": 32}
    (tmp_path / f"{first[0]}.json").write_text(json.dumps(stale))
    cache.reload()
    assert s2.next_cell(config, cache)[0].key == first[0]


def _parse(key):
    model = "mlp-bn"
    rest = key[len(model) + 1:].split("-")
    recipe, batch, epochs, bn, lr, seed = rest
    return model, recipe, int(batch[1:]), int(epochs[1:]), float(lr[2:]), int(seed[1:]), "ghost"


def test_study_v2_plan_seeds_then_convergence_runs_then_512(tmp_path):
    """With the baseline's and 2048's sgd/lars grids complete, seeds 1-4 follow, then E = 60 of the baseline."""
    config = s2.Config(models=("mlp-bn",), results=tmp_path)
    cache = s2.Cache(tmp_path)
    peaks = {("sgd", 128): 0.2, ("sgd", 2048): 0.05, ("lars", 2048): 0.2}
    for (recipe, batch), peak in peaks.items():
        for lr in (peak, peak / 2, peak * 2):
            held_out = 0.9 - abs(math.log2(lr / peak)) / 100
            _write(tmp_path, s2.Cell("mlp-bn", recipe, batch, 30, s2.round_lr(lr)), held_out)
    cache.reload()
    cell, _ = s2.next_cell(config, cache)
    assert cell == s2.Cell("mlp-bn", "sgd", 128, 30, 0.2, 1)
    for (recipe, batch), peak in peaks.items():
        for seed in range(1, 5):
            _write(tmp_path, s2.Cell("mlp-bn", recipe, batch, 30, peak, seed), 0.9)
    cache.reload()
    cell, _ = s2.next_cell(config, cache)
    assert cell == s2.Cell("mlp-bn", "sgd", 128, 60, 0.2, 0)  # the convergence check of the baseline
    for seed in range(5):
        _write(tmp_path, s2.Cell("mlp-bn", "sgd", 128, 60, 0.2, seed), 0.9)
    cache.reload()
    cell, _ = s2.next_cell(config, cache)
    # the 2048 winner waits for K-FAC and SP-NGD: the 512 grids come next
    assert cell == s2.Cell("mlp-bn", "sgd", 512, 30, 0.4, 0)
    assert s2.winner(cache, "mlp-bn", 2048) is None
