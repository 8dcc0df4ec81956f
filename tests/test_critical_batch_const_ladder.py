"""Goal 3 at constant LR (benchmarks/adaptive_batch.py, cells ``const-<B>-x<m>``): the helpers on constructed inputs."""

import json
import math

import pytest

from benchmarks import adaptive_batch as ab


def test_parse_const_cell_round_trips_every_cell_and_rejects_others():
    for cell in ab.const_cells():
        batch, mult = ab.parse_const_cell(cell)
        assert cell == f"const-{batch}-x{mult:g}"
    with pytest.raises(ValueError, match="const-<batch>-x<multiplier>"):
        ab.parse_const_cell("const-128-2")


def test_const_cells_follow_the_protocol_order_and_the_cap():
    cells = ab.const_cells()
    # x1 for every batch first, then x2, then x0.5 (dropped first when compute runs out)
    assert cells[:5] == [f"const-{b}-x1" for b in ab.CONST_BATCHES]
    assert [ab.parse_const_cell(c)[1] for c in cells] == sorted(
        (ab.parse_const_cell(c)[1] for c in cells), key=ab.CONST_LR_MULTIPLIERS.index)
    peaks = {c: ab.parse_const_cell(c)[1] * 0.1 * ab.parse_const_cell(c)[0] / 128 for c in cells}
    assert max(peaks.values()) <= ab.CONST_LR_CAP
    assert "const-2048-x2" not in cells  # 3.2 is over the cap of 1.6
    assert "const-1024-x2" in cells  # exactly 1.6


def test_best_over_lr_takes_the_fewest_steps_and_ignores_unreached():
    assert ab.best_over_lr({0.1: 300.0, 0.2: None, 0.05: 250.0}) == (250.0, 0.05)
    assert ab.best_over_lr({0.1: 120.0, 0.2: 120.0}) == (120.0, 0.1)  # a tie goes to the smaller LR
    assert ab.best_over_lr({0.1: None, 0.2: None}) == (math.inf, None)


def test_ladder_knee_on_a_constructed_ladder():
    # S = 100 (1 + 512 / B): S(2B)/S(B) = (B + 256) / (B + 512) crosses 0.75 at B = 512 (= B_crit)
    means = {b: (100 * (1 + 512 / b), 0.0) for b in (128, 256, 512, 1024, 2048)}
    rows, knee = ab.ladder_knee(means)
    ratios = {b: r for b, _, _, r in rows}
    assert ratios[256] == pytest.approx((256 + 256) / (256 + 512))
    assert ratios[2048] is None
    # 0.75 exactly at B_crit = 512 still counts as halving: the first batch beyond which none does is 1024
    assert (ratios[512], knee) == (0.75, 1024)
    assert ab.fit_b_crit({b: m for b, (m, _) in means.items()}) == pytest.approx(512)


def test_ladder_knee_unreached_batch_and_no_knee():
    halving = {b: (1000 / b, 0.0) for b in (128, 256, 512)}
    assert ab.ladder_knee(halving)[1] is None  # every doubling halves the steps
    with_wall = {**halving, 1024: (math.inf, 0.0)}
    assert ab.ladder_knee(with_wall)[1] == 512  # doubling into a batch that never reaches the target halves nothing
    # two unreached batches in a row: the doubling between them halves nothing either (inf / inf is not a ratio)
    rows, knee = ab.ladder_knee({**with_wall, 2048: (math.inf, 0.0)})
    assert knee == 512 and rows[3][3] == math.inf
    assert ab.fit_b_crit({128: 10.0, 256: 10.0}) is None  # too few points
    assert ab.fit_b_crit({128: 5.0, 256: 10.0, 512: 20.0}) is None  # steps grow with the batch: no critical batch


def _curve(reach_step: int | None, every: int, last: int) -> list:
    """Validation accuracy 0.5 until ``reach_step``, 0.9 from there (every ``every`` steps up to ``last``)."""
    return [(s, 0, 0.9 if reach_step is not None and s >= reach_step else 0.5) for s in range(every, last + 1, every)]


def test_const_ladder_takes_the_minimum_over_the_complete_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "RESULTS", tmp_path)
    model, seeds = "mlp-bn", [0, 1]
    # the step each run first validates at 0.9 (0.5 before): interpolated to 0.86 at that step - 1
    reach = {1.0: {128: 400, 256: 200, 512: 100, 1024: 80, 2048: 70},
             2.0: {128: 300, 256: 220, 512: 90, 1024: None}}
    for mult, per_batch in reach.items():
        for b, step in per_batch.items():
            for s in seeds:
                path = ab.cell_path(model, f"const-{b}-x{mult:g}", s)
                path.parent.mkdir(parents=True, exist_ok=True)
                run = {"curve": _curve(step, 10, 1000), "seed": s, "load_before": 1.0, "wall_s": 2.0, "threads": 1}
                path.write_text(json.dumps(run))
    # x0.5 ran for one cell only: not a complete grid, so it must not enter any minimum
    ab.cell_path(model, "const-1024-x0.5", 0).write_text(json.dumps({"curve": _curve(20, 10, 1000), "steps": 20}))
    table, grid = ab.const_ladder(model, seeds)
    assert grid == [1.0, 2.0]
    assert table[128][0] == (pytest.approx(299.0), pytest.approx(0.2))  # x2 (LR 0.2) beats x1 at 128
    assert table[256][1][1] == pytest.approx(0.2)  # x1 (LR 0.2) beats x2 at 256
    assert table[1024][0][1] == pytest.approx(0.8)  # x2 never reached; x0.5's 20 steps are not in the grid
    assert table[2048][0][1] == pytest.approx(1.6)  # only x1 under the cap
    lines = ab.const_lines(model, seeds)
    # per-batch minima 299, 199, 89, 79, 69: doublings x0.67, x0.45, x0.89, x0.87 -> the knee is 512
    assert any(line.startswith("- constant-LR knee") and line.split(": ")[1].startswith("512;") for line in lines)
    assert "| 1024 | 79 (LR 0.8) | 79 (LR 0.8) | 79 ± 0 | 0.87 |" in lines
    assert any("outside that grid" in line and "const-1024-x0.5 seed 0: 19 steps" in line for line in lines)


def test_const_ladder_empty_without_a_complete_multiplier(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "RESULTS", tmp_path)
    path = ab.cell_path("cnn", "const-128-x1", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"curve": _curve(100, 10, 200), "seed": 0, "load_before": 1.0, "wall_s": 1.0,
                                "threads": 1}))
    assert ab.const_ladder("cnn", [0]) == ({}, [])
    assert "no complete LR grid yet" in ab.const_lines("cnn", [0])[0]
