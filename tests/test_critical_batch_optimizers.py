"""The critical-batch-per-optimizer study's pure parts: grid planning, the fit, its spread, the knee, the verdict."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from benchmarks import adaptive_batch as ab
from benchmarks import critical_batch_optimizers as cbo
from benchmarks.critical_batch_optimizers import Outcome


def synthetic_steps(opt: str, batch: int, k: int, seed: int) -> Outcome:
    """A smooth study: steps ``S_min (1 + B_crit / B)`` times a penalty for the LR's distance to its best.

    The best ``k`` grows like ``log2(B) / 2`` (between no scaling and the linear rule); far above
    it the run diverges, far below it it does not reach the target.
    """
    b_crit = {"sgd": 1000, "kfac": 4000, "lars": 1500, "adamw": 800, "spngd": 3000}[opt]
    best = math.log2(batch / 128) / 2 + {"sgd": 0.3, "kfac": 1.6, "lars": -0.2, "adamw": 0.1, "spngd": -1.4}[opt]
    distance = k - best
    if distance > 2.5:
        return Outcome(None, diverged=True)
    if distance < -3.5:
        return Outcome(None)
    return Outcome(50 * (1 + b_crit / batch) * (1 + 0.3 * distance ** 2) * (1 + 0.05 * seed))


def test_budget_steps_floor_and_epochs():
    """Ten epochs at small batches, the 400-step floor at 8192 (7 steps per epoch)."""
    assert cbo.budget_steps(128) == 10 * math.ceil(55000 / 128) == 4300
    assert cbo.steps_per_epoch(8192) == 7
    assert cbo.budget_steps(8192) == 400
    assert cbo.budget_steps(2048) == 400 and cbo.budget_steps(1024) == 540


def test_next_grid_k_centre_then_neighbours():
    """Centre, then one up, then one down, whatever the results so far."""
    assert cbo.next_grid_k(2, {}) == 2
    assert cbo.next_grid_k(2, {2: Outcome(100.0)}) == 3
    assert cbo.next_grid_k(2, {2: Outcome(100.0), 3: Outcome(None, True)}) == 1


def test_next_grid_k_interior_best_ends_the_grid():
    """A best point with worse neighbours on both sides needs no more runs."""
    assert cbo.next_grid_k(0, {0: Outcome(100.0), 1: Outcome(120.0), -1: Outcome(130.0)}) is None


def test_next_grid_k_extends_toward_an_edge_best():
    """The best at the top edge asks for k + 1 beyond it, at most MAX_EXTENSIONS times."""
    grid = {0: Outcome(100.0), 1: Outcome(80.0), -1: Outcome(130.0)}
    assert cbo.next_grid_k(0, grid) == 2
    grid[2] = Outcome(70.0)
    assert cbo.next_grid_k(0, grid) == 3
    grid[3] = Outcome(60.0)
    assert cbo.MAX_EXTENSIONS == 2 and cbo.next_grid_k(0, grid) is None
    down = {0: Outcome(100.0), 1: Outcome(120.0), -1: Outcome(90.0)}
    assert cbo.next_grid_k(0, down) == -2


def test_next_grid_k_failed_edge_is_a_worse_neighbour():
    """A diverged or not-reached edge does not count as an edge to extend beyond."""
    grid = {0: Outcome(100.0), 1: Outcome(None, diverged=True), -1: Outcome(None)}
    assert cbo.next_grid_k(0, grid) is None
    assert cbo.choose_k(grid) == 0


def test_next_grid_k_nothing_reached_moves_away_from_divergence():
    """No point reached: down when the largest LR diverged, up when it was only too slow."""
    diverged = {0: Outcome(None, True), 1: Outcome(None, True), -1: Outcome(None)}
    assert cbo.next_grid_k(0, diverged) == -2
    slow = {0: Outcome(None), 1: Outcome(None), -1: Outcome(None)}
    assert cbo.next_grid_k(0, slow) == 2


def test_choose_k_ties_go_to_the_smaller_lr():
    """Equal steps: the smaller LR, as ``adaptive_batch.best_over_lr``."""
    assert cbo.choose_k({0: Outcome(90.0), 1: Outcome(90.0), -1: Outcome(95.0)}) == 0
    assert cbo.choose_k({0: Outcome(None), 1: Outcome(None, True)}) is None


def test_plan_order_first_grids_then_seeds_then_later_optimizers():
    """The pre-registered order over a synthetic study: sgd/kfac grids by batch, their seeds, then the rest."""
    cache: dict[tuple[str, int, int, int], Outcome] = {}

    def lookup(opt, batch, k, seed):
        return cache.get((opt, batch, k, seed))

    order = []
    while (nxt := cbo.plan(lookup)) is not None:
        assert nxt not in cache, f"{nxt} planned twice"
        order.append(nxt)
        cache[nxt] = synthetic_steps(*nxt)
    assert order[0] == ("sgd", 128, 0, 0)
    phase = [(o in cbo.FIRST, b in cbo.BATCHES, s > 0) for o, b, _, s in order]
    # phase 1: FIRST grids (seed 0) on the core batches, batch by batch; phase 2: FIRST seeds 1-2
    first_seed_run = next(i for i, (_, _, later_seed) in enumerate(phase) if later_seed)
    assert all(p == (True, True, False) for p in phase[:first_seed_run])
    assert [b for o, b, _, _ in order[:first_seed_run]] == sorted(b for o, b, _, _ in order[:first_seed_run])
    later = next(i for i, (first, _, _) in enumerate(phase) if not first)
    assert all(p == (True, True, True) for p in phase[first_seed_run:later])
    extra = next(i for i, (_, core, _) in enumerate(phase) if not core)
    assert all(not first and core for first, core, _ in phase[later:extra])
    assert all(not core for _, core, _ in phase[extra:])
    # every (optimizer, batch) has seeds 1-2 at seed 0's choice, and that choice is interior or at the limit
    for opt in cbo.OPTIMIZERS:
        for b in cbo.BATCHES + cbo.EXTRA_BATCHES:
            done, k = cbo.grid_choice(opt, b, lookup)
            assert done and k is not None
            grid = cbo.grid_outcomes(opt, b, lookup)
            assert min(grid) < k < max(grid) or len(grid) == 3 + cbo.MAX_EXTENSIONS
            assert all((opt, b, k, s) in cache for s in cbo.SEEDS)


def test_plan_centre_follows_the_previous_batch_choice():
    """At the next ladder batch (x4) the grid is centred one factor 2 above the previous choice."""
    cache = {("sgd", 128, k, 0): Outcome(s) for k, s in ((0, 100.0), (1, 80.0), (-1, 120.0), (2, 90.0))}

    def lookup(opt, batch, k, seed):
        return cache.get((opt, batch, k, seed))

    assert cbo.grid_choice("sgd", 128, lookup) == (True, 1)
    assert cbo.centre_k("sgd", 512, lambda o, b: cbo.grid_choice(o, b, lookup)[1]) == 2
    assert cbo.plan(lookup) == ("kfac", 128, 0, 0)
    assert cbo.centre_k("sgd", 256, lambda o, b: {128: 1, 512: 4}[b]) == 2  # floor of the neighbours' mean
    assert cbo.centre_k("sgd", 2048, lambda o, b: None) == 4  # nothing reached below: linear rule from 128


@pytest.mark.parametrize("b_crit", [300.0, 2000.0, 20000.0])
def test_b_crit_of_recovers_the_law_and_matches_the_ladder_fit(b_crit):
    """Exact ``S_min (1 + B_crit / B)`` data give back ``B_crit``, as ``adaptive_batch.fit_b_crit`` does."""
    steps = {b: 40.0 * (1 + b_crit / b) for b in (128, 512, 2048, 8192)}
    assert cbo.b_crit_of(steps) == pytest.approx(b_crit, rel=1e-9)
    assert cbo.b_crit_of(steps) == pytest.approx(ab.fit_b_crit(steps), rel=1e-12)
    intercept, slope = cbo.fit_line(steps)
    assert intercept == pytest.approx(40.0) and slope == pytest.approx(40.0 * b_crit)


def test_b_crit_of_degenerate_cases_are_named():
    """Too few batches: None; steps falling like 1/B or faster: inf; not falling: 0."""
    assert cbo.b_crit_of({128: 100.0, 512: 30.0}) is None
    assert cbo.b_crit_of({128: 1000.0, 512: 240.0, 2048: 50.0}) == math.inf  # faster than 1/B: intercept < 0
    assert cbo.b_crit_of({128: 50.0, 512: 50.0, 2048: 60.0}) == 0.0


def test_fits_spread_per_seed_and_bootstrap():
    """Per-seed fits are the fits of each seed's column; the bootstrap brackets the fit on the mean."""
    rng = random.Random(0)
    per_batch = {b: [60.0 * (1 + 1500 / b) * rng.uniform(0.8, 1.2) for _ in range(3)] for b in (128, 512, 2048, 8192)}
    f = cbo.fits(per_batch)
    for i in range(3):
        assert f["per_seed"][i] == pytest.approx(ab.fit_b_crit({b: v[i] for b, v in per_batch.items()}))
    # brute force over the 27 resamples, with the same quantile rule
    boot = sorted(cbo.b_crit_of({b: sum(v[i] for i in d) / 3 for b, v in per_batch.items()})
                  for d in itertools.product(range(3), repeat=3))
    assert f["boot_10"] == pytest.approx(boot[int(0.1 * 27)]) and f["boot_90"] == pytest.approx(boot[int(0.9 * 27)])
    assert f["boot_10"] <= f["mean"] <= f["boot_90"]


def test_knee_per_doubling_matches_ladder_knee_on_a_doubling_ladder():
    """On a x2 ladder the per-doubling rule is ``adaptive_batch.ladder_knee`` exactly (a second code path)."""
    rng = random.Random(1)
    for _ in range(200):
        means = {128 * 2 ** i: rng.choice([rng.uniform(20, 400), math.inf]) for i in range(6)}
        rows, knee = cbo.knee_per_doubling(means)
        ref_rows, ref_knee = ab.ladder_knee({b: (m, 0.0) for b, m in means.items()})
        assert knee == ref_knee
        ref = {b: r for b, _, _, r in ref_rows if r is not None}
        assert [b1 for b1, _, _ in rows] == list(ref)
        assert [r for _, _, r in rows] == pytest.approx(list(ref.values()))


def test_knee_per_doubling_on_a_x4_ladder():
    """A x4 rung's steps ratio is spread over its two doublings: S(4B) / S(B) = 0.25 is 0.5 per doubling."""
    rows, knee = cbo.knee_per_doubling({128: 400.0, 512: 100.0, 2048: 80.0, 8192: 75.0})
    assert [r for _, _, r in rows] == pytest.approx([0.5, 0.8 ** 0.5, (75 / 80) ** 0.5])
    assert knee == 512


def test_ratio_handles_infinite_and_zero_b_crit():
    """A curvature method with no diminishing return over the range against a finite SGD: inf."""
    assert cbo.ratio(4000.0, 1000.0) == 4.0
    assert cbo.ratio(math.inf, 1000.0) == math.inf
    assert cbo.ratio(math.inf, math.inf) is None and cbo.ratio(0.0, 0.0) is None
    assert cbo.ratio(None, 1000.0) is None and cbo.ratio(500.0, 0.0) == math.inf


def test_verdict_rule():
    """Confirmed: mean ratio >= 2 and 2 of 3 seeds; refuted: < 2 and 2 of 3 seeds below; else inconclusive."""
    assert cbo.verdict(2.5, [2.1, 3.0, 1.2]) == "confirmed"
    assert cbo.verdict(2.5, [2.1, 1.9, 1.2]) == "inconclusive"
    assert cbo.verdict(1.2, [0.9, 1.5, 2.5]) == "refuted"
    assert cbo.verdict(1.9, [2.2, 2.5, 1.0]) == "inconclusive"
    assert cbo.verdict(math.inf, [math.inf, 3.0, 2.0]) == "confirmed"
    assert cbo.verdict(None, [2.0, 2.0, 2.0]) == "inconclusive"
    assert cbo.verdict(3.0, [2.0, None, 2.0]) == "inconclusive"


def test_optimizer_setup_rejects_unknown_names():
    """A typo in an optimizer name fails with the supported list."""
    with pytest.raises(ValueError, match="Invalid optimizer: 'sdg'. Supported"):
        cbo.optimizer_setup("sdg", 0.1)


def test_optimizer_setup_kfac_uses_the_recipe_configuration():
    """K-FAC and SP-NGD take the recipes' factories with only the LR replaced (every-step refresh for kfac)."""
    from lightning_lbo import recipes

    kfac, callbacks, _ = cbo.optimizer_setup("kfac", 0.08)
    ref = recipes.kfac(128, 1, 1).optimizer
    assert kfac.lr == 0.08 and kfac.factor_update_interval == 1 and kfac.inverse_update_interval == 1
    assert {f: getattr(kfac, f) for f in kfac.__dataclass_fields__ if f != "lr"} == \
        {f: getattr(ref, f) for f in ref.__dataclass_fields__ if f != "lr"}
    from lightning_lbo.callbacks import KFACCallback

    assert len(callbacks) == 1 and isinstance(callbacks[0], KFACCallback)
    spngd, _, _ = cbo.optimizer_setup("spngd", 0.01)
    assert spngd.fisher == "mc" and spngd.unit_wise_bn and spngd.stale_threshold == 0.5 and spngd.momentum_correction


def test_run_cell_sgd_reproduces_the_adaptive_batch_ladder_run(monkeypatch):
    """The runner's sgd cell is the ladder's ``const-512-x1`` run: the same validation curve (a second code path)."""
    import warnings

    import torch

    monkeypatch.setattr(ab, "TRAIN_SUBSET", 8000)
    monkeypatch.setattr(cbo, "BUDGET_MIN_STEPS", 0)  # 10 epochs, no 400-step floor: the runs stay short
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ladder = ab.run_cell("mlp-bn", "const-512-x1", 0, epochs=2)  # LR 0.1 x 512 / 128, 4 epochs at most
    ours = cbo.run_cell("sgd", 512, 2, 0)  # LR_128 x 2^2
    assert ours["lr"] == pytest.approx(0.4) and len(ladder["curve"]) >= 8
    n = min(len(ladder["curve"]), len(ours["curve"]))
    assert ours["curve"][:n] == ladder["curve"][:n]


def test_run_cell_stops_a_diverging_run(monkeypatch):
    """An LR far too large stops at the divergence check instead of running the whole budget."""
    import warnings

    monkeypatch.setattr(ab, "TRAIN_SUBSET", 7000)
    warnings.filterwarnings("ignore")
    result = cbo.run_cell("sgd", 256, 12, 0)  # LR 409.6
    assert result["diverged"] and result["steps_to_target"] is None
    assert result["steps"] < result["budget_steps"]


def test_why_missing_names_the_reason_a_batch_is_outside_the_fits():
    """No LR reached, seeds still to run, or a seed that did not reach: each is said."""
    assert cbo.why_missing({"k": None, "steps": {}}) == "no LR reached on seed 0"
    assert cbo.why_missing({"k": 1, "steps": {0: 90.0}}) == "seeds 1, 2 not run yet"
    assert cbo.why_missing({"k": 1, "steps": {0: 90.0, 1: math.inf, 2: 80.0}}) == "not reached on seed 1"
    lad = {128: {"k": 0, "steps": {0: 300.0, 1: 320.0, 2: 310.0}}, 512: {"k": 1, "steps": {0: 90.0, 1: math.inf}}}
    assert cbo.complete_batches(lad) == {128: [300.0, 320.0, 310.0]}
