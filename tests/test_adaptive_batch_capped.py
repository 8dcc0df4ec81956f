"""Goal 2, ABS capped at the advisor (benchmarks/adaptive_batch.py, cells ``abs-capped`` / ``absa-capped``)."""

import json

import pytest

from benchmarks import adaptive_batch as ab


def write_advice(root, model: str, seed: int, recommended_batch: int) -> None:
    path = root / model / f"advise-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recommended_batch": recommended_batch, "b_simple": 0.9 * recommended_batch}))


def test_cap_is_the_cached_advice_of_the_same_model_and_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "RESULTS", tmp_path)
    write_advice(tmp_path, "mlp-bn", 0, 512)
    write_advice(tmp_path, "mlp-bn", 1, 1024)
    write_advice(tmp_path, "cnn", 0, 256)
    assert ab.advised_factor("mlp-bn", 0) == 4
    assert ab.advised_factor("mlp-bn", 1) == 8
    assert ab.advised_factor("cnn", 0) == 2
    write_advice(tmp_path, "cnn", 1, 64)  # advice below the base batch: no growth rather than a factor of 0
    assert ab.advised_factor("cnn", 1) == 1


def test_missing_advice_names_the_cell_to_run_first(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "RESULTS", tmp_path)
    write_advice(tmp_path, "mlp-bn", 0, 512)
    with pytest.raises(RuntimeError, match="--model mlp-bn --seeds 2 --cells advise"):
        ab.advised_factor("mlp-bn", 2)
    with pytest.raises(RuntimeError, match="--model cnn --seeds 0 --cells advise"):
        ab.advised_factor("cnn", 0)


def test_capped_cells_are_in_the_study_order_after_the_paper_cells():
    order = ab.cell_order()
    assert order.index("abs-capped") > order.index("abs-paper")
    assert order.index("absa-capped") > order.index("absa-paper")
