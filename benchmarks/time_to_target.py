"""Time to target (issue 25, deliverable 3): wall clock and optimizer steps to the baseline's accuracy - 0.5 points.

This docstring is the protocol. It was committed before the first timed run; it does not change once timed
runs exist (a change starts a new cache folder).

As filed (issue 25, deliverable 3): for the 2048 cells, wall-clock (and optimizer steps) to the baseline's
accuracy - 0.5, for K-FAC with every-step refresh and with the amortised refresh of the class defaults, against
the best first-order recipe, same process pattern and thread count. Goal: K-FAC <= 0.7x the best first-order
recipe's time to target on MLP-BN and the SmallCNN. The ``kfac`` and ``spngd`` recipes default to whichever
refresh schedule wins on time at equal accuracy.

Protocol
--------
* Cells: batch 2048 of study v2 (:mod:`benchmarks.study_v2`) on MLP-BN and the SmallCNN: the same data (the
  fixed 5k held-out split, every image once per epoch), ghost BN over 128 examples, precise BN for
  evaluation, a 2-epoch warmup and each recipe's decay over the study's E = 30 epochs (the schedule does not
  know about the early stop below, so a run's trajectory is the study's run until it stops).
* Arms (:data:`ARMS`): ``kfac-every-step`` (the ``kfac`` recipe as in the study: factors and inverses every
  step), ``kfac-amortised`` (the same recipe and LR with the K-FAC class defaults' refresh: factors every 10
  steps, inverses every 10; nothing else changed, so the factors' running average takes a new statistic
  every 10 steps), and the first-order recipes ``sgd`` and ``lars``. Every arm runs at study v2's chosen
  (seed-0 held-out) LR of its recipe at that cell; the amortised arm is not re-tuned (it takes the K-FAC
  LR). Recipe keyword arguments are study v2's (:meth:`benchmarks.study_v2.Cell.recipe_kwargs`).
* Target: the baseline's accuracy is study v2's ``sgd`` at batch 128, E = 30, 5-seed mean of the final
  held-out accuracy; the target is that minus 0.5 points. Held-out, never test: the test split is not used.
* Measurement: held-out accuracy every ``ceil(steps_per_epoch / 3)`` optimizer steps (9 at 2048, three
  evaluations per epoch) and at the end, against optimizer steps and training wall seconds (Lightning's
  validation loops, precise-BN passes included, excluded; data loading, forward, backward, optimizer step and
  the recipes' callbacks counted: :class:`lightning_lbo.compare.History`). Time and steps to target are those
  of the first evaluation at or above the target; a run stops there (or at E = 30: "not reached").
* Same process pattern: every run is a fresh child process (:func:`lightning_lbo.compare._run_in_child`),
  ``--threads`` torch threads (default 1) for every arm, every slot of the shared benchmark lock
  (:mod:`benchmarks.bench_lock`, ``exclusive=True``: no other benchmark unit runs beside a timed run).
* Seeds 0, 1, 2 (initialisation and shuffling). Interleaving: rounds, one per (seed, model); in round r the
  arms run in the order of :data:`ARMS` rotated by r, so a slow period of the machine hits every arm and no
  arm always runs first. Timings count only from a quiet machine: the lead runs this when no other job
  runs; the load average before and after each run is recorded beside it.

Analysis (``--analyse``, from the cache only)
---------------------------------------------
Per model and arm: seconds and steps to target per seed, their medians, seconds per step, reached count.
The best first-order recipe is the first-order arm with the lower median seconds to target among those that
reach it on every seed. Per K-FAC arm: the ratio of its median seconds to the best first-order median (and
the per-seed ratios of the same round), steps likewise; goal met when the time ratio is <= 0.7 and the arm
reached the target on every seed. The refresh-schedule verdict: the K-FAC arm with the lower median seconds
to target among those reaching it on every seed ("tie" when within 5% of each other).

Usage::

    PYTHONPATH=$PWD python benchmarks/time_to_target.py --dry-run        # the runs, in order
    PYTHONPATH=$PWD python benchmarks/time_to_target.py                  # on a quiet machine
    PYTHONPATH=$PWD python benchmarks/time_to_target.py --analyse
    PYTHONPATH=$PWD python benchmarks/time_to_target.py --smoke          # 3 epochs, 1 run, a throwaway folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "time_to_target"
if str(HERE.parent) not in sys.path:  # `python benchmarks/time_to_target.py` from the repository root
    sys.path.insert(0, str(HERE.parent))

from benchmarks import study_v2 as v2  # noqa: E402 - after the path fix above

BATCH = 2048
MODELS = ("mlp-bn", "cnn")
SEEDS = (0, 1, 2)
TARGET_SLACK = 0.005  # 0.5 points below the baseline's accuracy
EVALS_PER_EPOCH = 3
GOAL_RATIO = 0.7
TIE = 0.05
#: arm -> (recipe, recipe keyword arguments over study v2's); first-order arms have no K-FAC arguments.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac-every-step": ("kfac", {"factor_update_interval": 1, "inverse_update_interval": 1}),
    "kfac-amortised": ("kfac", {"factor_update_interval": 10, "inverse_update_interval": 10}),
    "sgd": ("sgd", {}),
    "lars": ("lars", {}),
}
FIRST_ORDER = ("sgd", "lars")
KFAC_ARMS = ("kfac-every-step", "kfac-amortised")
PROTOCOL: dict[str, Any] = {"study": "time-to-target-v1", "study_v2": v2.PROTOCOL, "epochs": v2.EPOCHS,
                            "evals_per_epoch": EVALS_PER_EPOCH, "target_slack": TARGET_SLACK}


# ------------------------------------------------------------------------------------- pure parts


def eval_every(batch: int) -> int:
    """Optimizer steps between held-out evaluations: a third of an epoch, rounded up."""
    return -(-v2.steps_per_epoch(batch) // EVALS_PER_EPOCH)


def first_at_target(history: Sequence[Sequence[float]], target: float) -> tuple[int, float] | None:
    """``(steps, train seconds)`` of the first ``(step, seconds, acc)`` record with ``acc >= target``, else None."""
    for step, seconds, acc in history:
        if acc is not None and math.isfinite(acc) and acc >= target:
            return int(step), float(seconds)
    return None


def schedule(models: Sequence[str] = MODELS, seeds: Sequence[int] = SEEDS,
             arms: Sequence[str] = tuple(ARMS)) -> list[tuple[str, str, int]]:
    """``(model, arm, seed)`` in run order: rounds of every arm, the arm order rotated by the round's index."""
    order, r = [], 0
    for seed in seeds:
        for model in models:
            k = r % len(arms)
            order += [(model, arm, seed) for arm in (*arms[k:], *arms[:k])]
            r += 1
    return order


@dataclass(frozen=True)
class Run:
    """One timed training run."""

    model: str
    arm: str
    seed: int
    base_lr: float
    target: float
    epochs: int = v2.EPOCHS

    @property
    def recipe(self) -> str:
        return ARMS[self.arm][0]

    @property
    def key(self) -> str:
        return f"{self.model}-{self.arm}-b{BATCH}-e{self.epochs}-lr{self.base_lr:.4g}-s{self.seed}"

    def recipe_kwargs(self) -> dict[str, Any]:
        cell = v2.Cell(self.model, self.recipe, BATCH, v2.EPOCHS, self.base_lr, self.seed)
        return {**cell.recipe_kwargs(), **ARMS[self.arm][1]}


def baseline_target(cache: v2.Cache, model: str) -> float:
    """Study v2's ``sgd`` at 128, E = 30: 5-seed mean final held-out accuracy, minus 0.5 points."""
    records = v2.Grid(model, "sgd", v2.BASELINE_BATCH).seed_records(cache, v2.MAIN_SEEDS)
    if records is None:
        raise ValueError(f"{model}: study v2's baseline (sgd at {v2.BASELINE_BATCH}, E = {v2.EPOCHS}) has no complete "
                         f"{v2.MAIN_SEEDS}-seed set in {cache.results}; run benchmarks/study_v2.py first, or pass "
                         "--target for a smoke run.")
    return sum(v2.score(r) for r in records) / len(records) - TARGET_SLACK


def chosen_lr(cache: v2.Cache, model: str, recipe: str) -> float:
    """Study v2's chosen LR of ``recipe`` at (``model``, 2048), ghost BN, E = 30."""
    lr = v2.Grid(model, recipe, BATCH).chosen(cache)
    if lr is None:
        raise ValueError(f"{model}: study v2's LR grid of {recipe} at {BATCH} is not complete in {cache.results}; "
                         "run benchmarks/study_v2.py first, or pass --lr for a smoke run.")
    return lr


def plan_runs(cache: v2.Cache, models: Sequence[str] = MODELS, seeds: Sequence[int] = SEEDS,
              arms: Sequence[str] = tuple(ARMS), target: float | None = None,
              lrs: dict[str, float] | None = None, epochs: int = v2.EPOCHS) -> list[Run]:
    """Every run of the protocol in order (targets and LRs from study v2's cache unless given)."""
    lrs = lrs or {}
    runs = []
    for model, arm, seed in schedule(models, seeds, arms):
        recipe = ARMS[arm][0]
        lr = lrs.get(recipe) if recipe in lrs else chosen_lr(cache, model, recipe)
        runs.append(Run(model, arm, seed, lr, baseline_target(cache, model) if target is None else target, epochs))
    return runs


class Records:
    """The finished runs under ``results`` (one JSON each), reused only with today's protocol and target."""

    def __init__(self, results: Path) -> None:
        self.results = results

    def get(self, run: Run) -> dict[str, Any] | None:
        path = self.results / f"{run.key}.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        same = (record.get("protocol") == PROTOCOL and record.get("target") == run.target
                and record.get("recipe_kwargs") == json.loads(json.dumps(run.recipe_kwargs())))
        return record if same else None


# --------------------------------------------------------------------------------------- running


def _ttt_classifier_class() -> type:
    base = v2.StudyClassifier

    class TimeToTargetClassifier(base):
        """Study v2's classifier that stops training at the first evaluation at or above ``target``."""

        def __init__(self, target: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.target = target

        def on_validation_epoch_end(self) -> None:
            super().on_validation_epoch_end()
            if self._val_sums is not None and not self.trainer.sanity_checking:
                _, correct, count = self._val_sums.tolist()  # once per evaluation, not per step
                if correct / count >= self.target:
                    self.trainer.should_stop = True

    return TimeToTargetClassifier


def __getattr__(name: str) -> Any:  # the Lightning class is built on first use: the pure parts import no Lightning
    if name == "TimeToTargetClassifier":
        cls = globals().get("_BUILT_TTT")
        if cls is None:
            cls = _ttt_classifier_class()
            cls.__module__, cls.__qualname__ = __name__, name
            globals()["_BUILT_TTT"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(run: Run, results: Path, threads: int = 1, accelerator: str = "cpu", data_dir: str | None = None,
          runner: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Train ``run`` in a fresh child process holding every benchmark slot; write and return its record."""
    from benchmarks.bench_lock import bench_lock
    from lightning_lbo.compare import RunSpec, _run_in_child

    fd, metrics_path = tempfile.mkstemp(suffix=".json", prefix="lbo-ttt-")
    os.close(fd)
    spec = RunSpec(run.recipe, BATCH, run.epochs, recipe_kwargs=run.recipe_kwargs(),
                   module="benchmarks.time_to_target:TimeToTargetClassifier",
                   module_kwargs=dict(target=run.target, model_name=run.model, virtual_batch_size=v2.VIRTUAL_BATCH,
                                      precise_batches=v2.precise_batches(BATCH), metrics_path=metrics_path),
                   datamodule="benchmarks.study_v2:StudyDataModule",
                   datamodule_kwargs=dict(data_dir=data_dir, shuffle_seed=run.seed),
                   seed=run.seed, eval_every=eval_every(BATCH), threads=threads, progress=False, test=False,
                   accelerator=accelerator)
    asked = time.time()
    try:
        with bench_lock(exclusive=True):
            load_before, start = os.getloadavg()[0], time.time()
            try:
                result = asdict((runner or _run_in_child)(spec))
            except Exception as err:  # a diverged or crashed run is a result ("not reached")
                result = {"recipe": run.recipe, "batch_size": BATCH, "error": f"{type(err).__name__}: {err}",
                          "history": []}
            end = time.time()
    finally:
        Path(metrics_path).unlink(missing_ok=True)
    reached = first_at_target(result.get("history") or [], run.target)
    record = {"run": asdict(run), "protocol": PROTOCOL, "target": run.target, "recipe_kwargs": run.recipe_kwargs(),
              "result": result, "steps_to_target": reached[0] if reached else None,
              "seconds_to_target": reached[1] if reached else None, "threads": threads, "accelerator": accelerator,
              "wall_seconds": end - start, "lock_wait_seconds": start - asked, "load_before": load_before,
              "load_after": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{run.key}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


def run_all(runs: Sequence[Run], results: Path, max_runs: int | None = None, log: Callable[[str], None] = print,
            **train_kwargs: Any) -> int:
    """Train the runs not cached yet, in order; returns how many were trained."""
    records, done = Records(results), 0
    for run in runs:
        if max_runs is not None and done >= max_runs:
            break
        if records.get(run) is not None:
            continue
        log(f"== {run.key} (target {100 * run.target:.2f})")
        record = train(run, results, **train_kwargs)
        res = record["result"]
        log(f"   steps to target {record['steps_to_target']}, seconds {record['seconds_to_target']}, "
            f"{record['wall_seconds']:.0f} s, load {record['load_before']:.1f}->{record['load_after']:.1f}"
            + (f", error {res['error']}" if res.get("error") else ""))
        done += 1
    return done


# -------------------------------------------------------------------------------------- analysis


@dataclass
class ArmSummary:
    """One arm's times and steps to target over its seeds (None: not reached on that seed)."""

    seconds: dict[int, float | None]
    steps: dict[int, int | None]
    seconds_per_step: float

    @property
    def reached_all(self) -> bool:
        return bool(self.seconds) and all(v is not None for v in self.seconds.values())

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds.values()) if self.reached_all else math.inf

    @property
    def median_steps(self) -> float:
        return statistics.median(self.steps.values()) if self.reached_all else math.inf


def summarise(records: Sequence[dict[str, Any]]) -> ArmSummary:
    seconds = {r["run"]["seed"]: r["seconds_to_target"] for r in records}
    steps = {r["run"]["seed"]: r["steps_to_target"] for r in records}
    per_step = [r["result"]["seconds_per_step"] for r in records if r["result"].get("seconds_per_step")]
    return ArmSummary(seconds, steps, statistics.median(per_step) if per_step else math.nan)


def compare_arms(arms: dict[str, ArmSummary]) -> dict[str, Any]:
    """The best first-order arm, each K-FAC arm's time and step ratios to it, the goal and the schedule verdict."""
    first = [a for a in FIRST_ORDER if a in arms and arms[a].reached_all]
    out: dict[str, Any] = {"best_first_order": None, "kfac": {}, "faster_schedule": None}
    if first:
        best = min(first, key=lambda a: (arms[a].median_seconds, FIRST_ORDER.index(a)))
        out["best_first_order"] = best
        for arm in KFAC_ARMS:
            if arm not in arms:
                continue
            s = arms[arm]
            ratio = s.median_seconds / arms[best].median_seconds
            per_seed = {seed: (s.seconds[seed] / arms[best].seconds[seed]
                               if s.seconds.get(seed) is not None and seed in arms[best].seconds else None)
                        for seed in s.seconds}
            out["kfac"][arm] = {"time_ratio": ratio, "step_ratio": s.median_steps / arms[best].median_steps,
                                "per_seed_time_ratio": per_seed, "goal_met": s.reached_all and ratio <= GOAL_RATIO}
    reached = [a for a in KFAC_ARMS if a in arms and arms[a].reached_all]
    if len(reached) == 2:
        a, b = (arms[k].median_seconds for k in KFAC_ARMS)
        out["faster_schedule"] = "tie" if abs(a - b) <= TIE * min(a, b) else KFAC_ARMS[0 if a < b else 1]
    elif reached:
        out["faster_schedule"] = reached[0]
    return out


def analyse(results: Path, runs: Sequence[Run]) -> str:
    """The protocol's analysis from the cache only."""
    records = Records(results)
    lines = []
    for model in dict.fromkeys(r.model for r in runs):
        model_runs = [r for r in runs if r.model == model]
        lines.append(f"## {model}, batch {BATCH} (target {100 * model_runs[0].target:.2f} held-out)")
        arms = {}
        for arm in dict.fromkeys(r.arm for r in model_runs):
            found = [records.get(r) for r in model_runs if r.arm == arm]
            if any(f is None for f in found):
                lines.append(f"{arm:16s} waiting ({sum(f is not None for f in found)}/{len(found)} seeds)")
                continue
            arms[arm] = s = summarise(found)
            fmt = ", ".join(f"s{k}: {'-' if v is None else f'{v:.0f} s/{s.steps[k]} steps'}"
                            for k, v in sorted(s.seconds.items()))
            lines.append(f"{arm:16s} lr {found[0]['run']['base_lr']:g} | {fmt} | median {s.median_seconds:.0f} s, "
                         f"{s.median_steps:g} steps | {1000 * s.seconds_per_step:.0f} ms/step")
        verdict = compare_arms(arms)
        if verdict["best_first_order"]:
            lines.append(f"best first-order: {verdict['best_first_order']}")
        for arm, v in verdict["kfac"].items():
            lines.append(f"{arm}: time ratio {v['time_ratio']:.2f} (goal <= {GOAL_RATIO}: "
                         f"{'MET' if v['goal_met'] else 'MISSED'}), step ratio {v['step_ratio']:.2f}, per seed "
                         + ", ".join(f"s{k}: {'-' if r is None else f'{r:.2f}'}"
                                     for k, r in sorted(v['per_seed_time_ratio'].items())))
        if verdict["faster_schedule"]:
            lines.append(f"faster K-FAC refresh schedule: {verdict['faster_schedule']}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=v2.v1._csv(str), default=MODELS, help="mlp-bn,cnn (default both)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run, every arm (default 1)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "cuda", "mps", "auto"))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: lbo data's search)")
    p.add_argument("--study-results", type=Path, default=v2.RESULTS, help="study v2's cache (LRs and target)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"this runner's cache (default {RESULTS})")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--dry-run", action="store_true", help="print the runs in order, cached or not")
    p.add_argument("--analyse", action="store_true", help="print the analysis from the cache")
    p.add_argument("--smoke", action="store_true",
                   help="one 3-epoch MLP-BN run into a temporary folder (target and LRs default to placeholders)")
    p.add_argument("--target", type=float, default=None, help="smoke only: held-out accuracy target (fraction)")
    p.add_argument("--lr", action="append", default=[], metavar="RECIPE=LR", help="smoke only: an LR per recipe")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown}; the protocol has {', '.join(MODELS)}.")
    if (args.target is not None or args.lr) and not args.smoke:
        raise SystemExit("--target and --lr change the protocol: they are for --smoke runs only.")
    lrs = {}
    for item in args.lr:
        recipe, _, value = item.partition("=")
        if recipe not in {r for r, _ in ARMS.values()} or not value:
            raise SystemExit(f"--lr {item!r}: use RECIPE=LR with RECIPE one of kfac, sgd, lars.")
        lrs[recipe] = float(value)
    train_kwargs = dict(threads=args.threads, accelerator=args.accelerator, data_dir=args.data_dir)
    if args.smoke:
        lrs = {"kfac": 0.04, "sgd": 0.05, "lars": 0.2, **lrs}
        runs = plan_runs(v2.Cache(args.study_results), ("mlp-bn",), (0,), ("kfac-amortised",),
                         target=0.5 if args.target is None else args.target, lrs=lrs, epochs=3)
        with tempfile.TemporaryDirectory(prefix="lbo-ttt-smoke-") as tmp:
            run_all(runs, Path(tmp), log=lambda m: print(m, flush=True), **train_kwargs)
            print(analyse(Path(tmp), runs))
        return 0
    try:
        runs = plan_runs(v2.Cache(args.study_results), tuple(args.models))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.dry_run:
        records = Records(args.results)
        print("\n".join(f"{r.key} (target {100 * r.target:.2f}){' cached' if records.get(r) else ''}" for r in runs))
        return 0
    if args.analyse:
        print(analyse(args.results, runs))
        return 0
    run_all(runs, args.results, max_runs=args.max_runs, log=lambda m: print(m, flush=True), **train_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
