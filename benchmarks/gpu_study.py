"""GPU variant of study v2's SmallCNN cells (issue 25, deliverable 6): the ``study`` part of the GPU check.

``make gpu-study`` (``python3 benchmarks/gpu_check.py --study``) runs, on one GPU in about 7 minutes, the
SmallCNN on Fashion-MNIST at E = 30 equal epochs with study v2's protocol (:mod:`benchmarks.study_v2`: the
fixed 5k held-out split, every image once per epoch, ghost BN over 128 examples, precise BN for evaluation,
a 2-epoch warmup, the v1 study's frozen recipe arguments, held-out accuracy after every epoch, the test
split once at the end), each run through :func:`lightning_lbo.compare.run_one` with ``accelerator="gpu"``.

Plan, in priority order (a run starts only while the part's budget leaves room for it, estimated from the
longest run of the same batch so far, else from :data:`FIRST_ESTIMATE_S`):

1. batch 2048, seed 0, short LR grids around study v2's centres (``GRID_CENTRES``): ``sgd``, ``lars``,
   ``kfac`` at half, once and twice the centre, round robin;
2. the baseline ``sgd`` at batch 128, seed 0, at half and once its centre (the v1 centre, 0.8, was chosen
   at 4 epochs with full-batch BN);
3. seeds 1 and 2 at the best seed-0 held-out LR: the 2048 recipes, then the baseline.

The figures give every run (LR, seed, final held-out and test accuracy, steps, seconds, seconds per step)
and per (recipe, batch) the chosen LR with its seed mean and spread; the results travel back in
``gpu_check.json`` under ``$OUT``. These are GPU numbers of a shortened design (3-value grids, 3 seeds), not
the pre-registered CPU study: they say whether its SmallCNN cells behave the same on a GPU, and what they cost.

Data: Fashion-MNIST is looked up as everywhere (``--data-dir``, ``$LBO_DATA_DIR``, Debian's package); the
GPU machine has no network, so carry the four idx files (``data/``, ignored by git: ``carry: ["data"]`` and
``LBO_DATA_DIR=data``). Without them the part fails at once, saying so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import study_v2 as v2  # noqa: E402 - after the path fix above
from benchmarks.gpu_check_parts import PartContext, PartResult  # noqa: E402

MODEL = "cnn"
BASELINE_BATCH, LARGE_BATCH = v2.BASELINE_BATCH, 2048
LARGE_RECIPES = ("sgd", "lars", "kfac")
#: the part's budget on the GPU machine (the GPU check's driver adds its probe and install)
BUDGET_S = 420.0
#: a run's duration before one of its batch was measured (H100 guesses: 430 steps/epoch at 128)
FIRST_ESTIMATE_S = {BASELINE_BATCH: 75.0, LARGE_BATCH: 12.0}


@dataclass(frozen=True)
class Size:
    """The sizes of one mode (full on the GPU, smoke on the CPU)."""

    epochs: int
    batches: tuple[int, int]  # (baseline, large)
    large_grid: tuple[float, ...]  # factors of the centre
    baseline_grid: tuple[float, ...]
    seeds: int
    train_subset: int | None  # training images before the held-out split (None: all 60k)
    val_size: int
    virtual_batch: int


FULL = Size(v2.EPOCHS, (BASELINE_BATCH, LARGE_BATCH), (0.5, 1.0, 2.0), (0.5, 1.0), 3, None, v2.VAL_SIZE,
            v2.VIRTUAL_BATCH)
SMOKE = Size(1, (64, 256), (1.0,), (1.0,), 2, 1536, 512, 32)


@dataclass(frozen=True)
class GpuRun:
    recipe: str
    batch: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{MODEL}-{self.recipe}-b{self.batch}-lr{self.lr:.4g}-s{self.seed}"


def centre(recipe: str, batch: int, size: Size) -> float:
    """Study v2's grid centre of the cell the run stands for (the smoke sizes map to the full batches)."""
    full_batch = LARGE_BATCH if batch == size.batches[1] else BASELINE_BATCH
    return v2.GRID_CENTRES[(MODEL, recipe, full_batch)]


def grid_runs(size: Size) -> list[GpuRun]:
    """Steps 1-2 of the plan: the seed-0 grids, 2048 recipes round robin, then the baseline."""
    base, large = size.batches
    runs = [GpuRun(r, large, v2.round_lr(centre(r, large, size) * f), 0)
            for f in size.large_grid for r in LARGE_RECIPES]
    return runs + [GpuRun("sgd", base, v2.round_lr(centre("sgd", base, size) * f), 0) for f in size.baseline_grid]


def best_lr(done: dict[str, dict[str, Any]], recipe: str, batch: int) -> float | None:
    """The seed-0 LR of (recipe, batch) with the highest final held-out accuracy (ties: the smaller LR)."""
    scored = {r["lr"]: r["final_acc"] for r in done.values()
              if r["recipe"] == recipe and r["batch"] == batch and r["seed"] == 0}
    scored = {lr: (acc if acc is not None and math.isfinite(acc) else -1.0) for lr, acc in scored.items()}
    return max(sorted(scored), key=lambda lr: scored[lr]) if scored else None


def seed_runs(size: Size, done: dict[str, dict[str, Any]]) -> list[GpuRun]:
    """Step 3: seeds 1.. at each cell's best seed-0 LR (2048 recipes first, then the baseline)."""
    base, large = size.batches
    runs = []
    for recipe, batch in [(r, large) for r in LARGE_RECIPES] + [("sgd", base)]:
        lr = best_lr(done, recipe, batch)
        if lr is not None:
            runs += [GpuRun(recipe, batch, lr, s) for s in range(1, size.seeds)]
    return runs


def fits(run: GpuRun, remaining: float, durations: dict[int, list[float]], size: Size) -> bool:
    """Whether the longest run of the same batch so far (else the first guess) fits in ``remaining`` seconds."""
    seen = durations.get(run.batch)
    guess = max(seen) if seen else FIRST_ESTIMATE_S[BASELINE_BATCH if run.batch == size.batches[0] else LARGE_BATCH]
    return guess <= remaining


def summarise(done: dict[str, dict[str, Any]], size: Size) -> dict[str, Any]:
    """Per (recipe, batch): the chosen LR, its seeds' held-out and test means and spreads, seconds per step."""
    out = {}
    base, large = size.batches
    for recipe, batch in [("sgd", base)] + [(r, large) for r in LARGE_RECIPES]:
        lr = best_lr(done, recipe, batch)
        if lr is None:
            continue
        recs = [r for r in done.values() if r["recipe"] == recipe and r["batch"] == batch and r["lr"] == lr]
        held = [r["final_acc"] for r in recs]
        test = [r["test_acc"] for r in recs]
        out[f"{recipe} b{batch}"] = {
            "grid (lr: seed-0 held-out)": {str(r["lr"]): r["final_acc"] for r in done.values()
                                           if r["recipe"] == recipe and r["batch"] == batch and r["seed"] == 0},
            "chosen_lr": lr, "seeds": len(recs), "held_out_mean": statistics.fmean(held),
            "held_out_std": statistics.stdev(held) if len(held) > 1 else None, "test_mean": statistics.fmean(test),
            "test_std": statistics.stdev(test) if len(test) > 1 else None,
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in recs),
            "wall_seconds_per_run": statistics.median(r["wall_seconds"] for r in recs)}
    return out


def _datamodule_class() -> type:
    base = v2.StudyDataModule

    class GpuStudyDataModule(base):
        """Study v2's data module, with a training subset and held-out size for the smoke sizes."""

        def __init__(self, batch_size: int, data_dir: str | None = None, shuffle_seed: int = 0,
                     train_subset: int | None = None, val_size: int = v2.VAL_SIZE) -> None:
            super().__init__(batch_size=batch_size, data_dir=data_dir, shuffle_seed=shuffle_seed)
            self.train_subset, self.val_size = train_subset, val_size

    return GpuStudyDataModule


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:  # built on first use: importing this module imports no Lightning
    if name == "GpuStudyDataModule":
        if name not in _BUILT:
            cls = _datamodule_class()
            cls.__module__, cls.__qualname__ = __name__, name
            _BUILT[name] = cls
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train_one(run: GpuRun, ctx: PartContext, size: Size) -> dict[str, Any]:
    """One run in this process (study v2's module and data on ``ctx.device``); its record."""
    from lightning_lbo.compare import RunSpec, run_one

    metrics = ctx.work_dir / f"study_{run.key}.json"
    spe = -(-((size.train_subset or 60000) - size.val_size) // run.batch)
    kwargs = {**v1_kwargs(run.recipe), "warmup_epochs": v2.WARMUP_EPOCHS * size.epochs / v2.EPOCHS,
              "base_lr": run.lr}
    spec = RunSpec(run.recipe, run.batch, size.epochs, recipe_kwargs=kwargs,
                   module="benchmarks.study_v2:StudyClassifier",
                   module_kwargs=dict(model_name=MODEL, virtual_batch_size=size.virtual_batch,
                                      precise_batches=max(1, -(-v2.PRECISE_EXAMPLES // run.batch)) if not ctx.smoke
                                      else 1, metrics_path=str(metrics)),
                   datamodule="benchmarks.gpu_study:GpuStudyDataModule",
                   datamodule_kwargs=dict(data_dir=os.environ.get("LBO_DATA_DIR"), shuffle_seed=run.seed,
                                          train_subset=size.train_subset, val_size=size.val_size),
                   seed=run.seed, eval_every=spe, threads=0, progress=False, test=True,
                   accelerator="gpu" if ctx.device == "cuda" else "cpu")
    start = time.perf_counter()
    result = run_one(spec)
    wall = time.perf_counter() - start
    epochs = json.loads(metrics.read_text()) if metrics.exists() else []
    return {"key": run.key, "recipe": run.recipe, "batch": run.batch, "lr": run.lr, "seed": run.seed,
            "final_acc": result.final_acc, "test_acc": result.test_acc, "steps": result.steps,
            "train_seconds": result.train_seconds, "seconds_per_step": result.seconds_per_step, "wall_seconds": wall,
            "final_train_loss": epochs[-1].get("train_loss") if epochs else None}


def v1_kwargs(recipe: str) -> dict[str, Any]:
    return dict(v2.v1.STUDY_RECIPE_KWARGS[recipe])


def part_study(ctx: PartContext, trainer: Callable[[GpuRun, PartContext, Size], dict[str, Any]] = train_one
               ) -> PartResult:
    """The plan within ``ctx.budget_s``: every run's record and the summary as figures."""
    size = SMOKE if ctx.smoke else FULL
    result = PartResult()
    from lightning_lbo.data import locate_fashion_mnist

    try:
        locate_fashion_mnist(os.environ.get("LBO_DATA_DIR"))
    except Exception as err:  # noqa: BLE001 - the report must say what is missing
        result.check("Fashion-MNIST found", False, f"{err} (carry data/ and set LBO_DATA_DIR=data)")
        return result
    done: dict[str, dict[str, Any]] = {}
    durations: dict[int, list[float]] = {}
    skipped: list[str] = []
    errors: list[str] = []
    margin = 10.0  # the report and the process exit after the last run

    def go(runs: list[GpuRun]) -> None:
        for run in runs:
            if run.key in done:
                continue
            if not fits(run, ctx.remaining() - margin, durations, size):
                skipped.append(run.key)
                continue
            try:
                record = trainer(run, ctx, size)
            except Exception as err:  # noqa: BLE001 - a crashed run is reported, the plan goes on
                errors.append(f"{run.key}: {type(err).__name__}: {err}"[:300])
                continue
            done[run.key] = record
            durations.setdefault(run.batch, []).append(record["wall_seconds"])
            print(f"[study] {run.key}: held-out {record['final_acc']:.4f}, test {record['test_acc']:.4f}, "
                  f"{record['wall_seconds']:.0f} s", flush=True)

    go(grid_runs(size))
    go(seed_runs(size, done))
    base, large = size.batches
    result.figures["runs"] = list(done.values())
    result.figures["summary"] = summarise(done, size)
    result.figures["size"] = {"epochs": size.epochs, "batches": size.batches, "seeds": size.seeds,
                              "train_subset": size.train_subset, "virtual_batch": size.virtual_batch}
    if skipped:
        result.notes.append(f"not started for lack of time: {', '.join(skipped)}")
    result.check("no run crashed", not errors, "; ".join(errors))
    finite = all(math.isfinite(r["final_acc"]) and math.isfinite(r["test_acc"]) for r in done.values())
    result.check("every run finished with finite held-out and test accuracy", bool(done) and finite,
                 f"{len(done)} runs")
    needed = [f"sgd b{base}"] + [f"{r} b{large}" for r in LARGE_RECIPES]
    have = [k for k in needed if k in result.figures["summary"]]
    result.check("the baseline and every 2048 recipe have at least one run", have == needed,
                 f"missing: {', '.join(sorted(set(needed) - set(have))) or 'none'}")
    return result
