"""Critical-batch advisor: the recommendation rule and the `lbo advise` command on real data."""

from __future__ import annotations

import json
import math

import pytest

from lightning_lbo.critical_batch import recommend


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


def test_lbo_advise_trains_briefly_and_writes_advice(tmp_path, capsys):
    """`lbo advise` on 1024 images: prints the estimate and recommendation, JSON and plot agree with it."""
    from lightning_lbo.cli import main

    out_json, out_png = tmp_path / "advice.json", tmp_path / "b_simple.png"
    code = main(["advise", "--model", "mlp", "--batch-size", "32", "--steps", "30", "--probe-every", "3",
                 "--train-subset", "1024", "--threads", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    advice = json.loads(out_json.read_text())
    printed = capsys.readouterr().out
    assert f"recommended global batch: {advice['recommended_batch']}" in printed
    assert advice["steps"] == 30 and len(advice["history"]) == 10  # logged at every probe: steps 0, 3, ..., 27
    assert advice["recommended_batch"] == recommend(advice["b_simple"], 32, 0.1)[0]
    assert out_png.stat().st_size > 1000
    assert main(["advise", "--steps", "1"]) == 2  # too short to estimate: exit code 2 with the reason
