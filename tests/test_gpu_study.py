"""benchmarks/gpu_study.py (the ``study`` part of the GPU check, ``--study``) without a GPU: the plan, the budget
rule, the summary with a fake trainer, the driver's arguments, and the real part on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks import gpu_study as gs
from benchmarks.gpu_check_parts import PartContext

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_study_plan_grids_first_then_seeds_at_the_best_lr():
    runs = gs.grid_runs(gs.FULL)
    assert [r.key for r in runs[:3]] == ["cnn-sgd-b2048-lr0.025-s0", "cnn-lars-b2048-lr0.2-s0",
                                         "cnn-kfac-b2048-lr0.01-s0"]  # half the centres, round robin
    assert len(runs) == 3 * 3 + 2 and {r.seed for r in runs} == {0}
    assert [r.lr for r in runs[-2:]] == [0.4, 0.8] and {r.batch for r in runs[-2:]} == {128}
    done = {r.key: {"recipe": r.recipe, "batch": r.batch, "lr": r.lr, "seed": 0, "final_acc": 0.8} for r in runs}
    done["cnn-lars-b2048-lr0.8-s0"]["final_acc"] = 0.9
    done["cnn-sgd-b128-lr0.4-s0"]["final_acc"] = float("nan")  # a diverged run never wins
    seeds = gs.seed_runs(gs.FULL, done)
    assert [r.key for r in seeds] == ["cnn-sgd-b2048-lr0.025-s1", "cnn-sgd-b2048-lr0.025-s2",  # ties: smaller LR
                                      "cnn-lars-b2048-lr0.8-s1", "cnn-lars-b2048-lr0.8-s2",
                                      "cnn-kfac-b2048-lr0.01-s1", "cnn-kfac-b2048-lr0.01-s2",
                                      "cnn-sgd-b128-lr0.8-s1", "cnn-sgd-b128-lr0.8-s2"]


def test_gpu_study_fits_uses_the_longest_run_of_the_batch_else_the_first_guess():
    run = gs.GpuRun("sgd", 128, 0.8, 1)
    assert not gs.fits(run, gs.FIRST_ESTIMATE_S[128] - 1, {}, gs.FULL)
    assert gs.fits(run, 50.0, {128: [40.0, 50.0]}, gs.FULL) and not gs.fits(run, 49.0, {128: [40.0, 50.0]}, gs.FULL)
    assert gs.fits(gs.GpuRun("kfac", 256, 0.02, 0), 13.0, {}, gs.SMOKE)  # the smoke large batch stands for 2048


def test_gpu_study_part_with_a_fake_trainer_stops_at_the_budget_and_summarises(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    ctx = PartContext("cpu", False, 140.0, tmp_path, started=0.0)
    monkeypatch.setattr(PartContext, "remaining", lambda self: self.budget_s - clock["t"])
    trained = []

    def fake(run, ctx, size):
        seconds = 40.0 if run.batch == 128 else 10.0
        clock["t"] += seconds
        trained.append(run.key)
        acc = 0.9 + 0.01 * run.seed - abs(run.lr - gs.centre(run.recipe, run.batch, size)) / 100
        return {"key": run.key, "recipe": run.recipe, "batch": run.batch, "lr": run.lr, "seed": run.seed,
                "final_acc": acc, "test_acc": acc - 0.01, "steps": 10, "train_seconds": seconds,
                "seconds_per_step": seconds / 10, "wall_seconds": seconds}

    import lightning_lbo.data

    monkeypatch.setattr(lightning_lbo.data, "locate_fashion_mnist", lambda data_dir: None)  # no data needed
    result = gs.part_study(ctx, trainer=fake).as_dict()
    # 9 grid runs at 10 s (90 s), then the baseline needs its 75 s guess: 140 - 90 - 10 (margin) = 40 < 75;
    # then the 2048 seeds at 10 s each: 4 of them fit (40 s)
    assert trained[:9] == [r.key for r in gs.grid_runs(gs.FULL)[:9]] and len(trained) == 13
    assert result["status"] == "fail"  # the baseline never ran
    assert any("sgd b128" in c["detail"] for c in result["checks"] if not c["ok"])
    summary = result["figures"]["summary"]
    assert summary["kfac b2048"]["chosen_lr"] == 0.02 and summary["sgd b2048"]["seeds"] == 3
    assert summary["sgd b2048"]["held_out_mean"] == pytest.approx(0.91)
    assert "not started for lack of time" in result["notes"][0]


def test_gpu_check_study_flag_plans_the_study_part_alone(capsys):
    assert gpu_check.plan(gpu_check.parse_args(["--study"])) == gpu_check.STUDY_BUDGETS
    assert gpu_check.STUDY_BUDGETS["study"] <= 7 * 60 + 15  # about 7 minutes of one GPU
    assert gpu_check.plan(gpu_check.parse_args(["--study", "--part-timeout", "study=30"])) == {"study": 30.0}
    assert gpu_check.plan(gpu_check.parse_args([])) == gpu_check.BUDGETS  # the default check is unchanged
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--study", "--parts", "sync"])
    assert "drop --parts" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_study_smoke_runs_the_study_on_cpu_and_writes_json(tmp_path):
    """The driver with ``--study --device cpu --smoke``: tiny sizes, every run trained, results in gpu_check.json."""
    pytest.importorskip("lightning_lbo.data").locate_fashion_mnist(os.environ.get("LBO_DATA_DIR"))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--study", "--device", "cpu",
                          "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=REPO_ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    part = report["parts"]["study"]
    assert out.returncode == 0 and part["status"] == "pass", out.stdout[-3000:] + json.dumps(part)[-3000:]
    runs = part["figures"]["runs"]
    assert len(runs) == 4 + 4  # 3 + 1 grid runs, then seed 1 of each
    assert {(r["recipe"], r["batch"]) for r in runs} == {("sgd", 64), ("sgd", 256), ("lars", 256), ("kfac", 256)}
    assert all(0.1 < r["final_acc"] <= 1.0 and r["steps"] > 0 for r in runs)
    assert set(part["figures"]["summary"]) == {"sgd b64", "sgd b256", "lars b256", "kfac b256"}
