"""The critical batch per optimizer: constant-LR steps-to-target ladders on MLP-BN (issue 25, item 4).

Pre-registration (written and committed before the first run; not changed after)
================================================================================

Hypothesis. A curvature method (K-FAC, SP-NGD) extends the critical batch >= 2x over momentum SGD
(Zhang et al. 2019, "Which algorithmic choices matter at which batch sizes?", arXiv 1907.04164, show
it qualitatively with a noisy quadratic model and on real networks; McCandlish et al. 2018,
arXiv 1812.06162, define the critical batch through ``S = S_min (1 + B_crit / B)``).

Protocol: McCandlish's, as the adaptive-batch study's goal 3 ladder (``benchmarks/adaptive_batch.py``,
cells ``const-<B>-x<m>``), reusing its data module, recorder, interpolation, knee and fit:

* model and data: ``mlp-bn`` (784-256-128-10 with BatchNorm), Fashion-MNIST, 55k training images,
  the same 5k held out for validation (every quarter epoch), 1 torch thread per run, each run one slot
  of the shared benchmark lock;
* target: 86% validation accuracy (the ladder's ``TARGETS["mlp-bn"]``); steps to the target are
  interpolated linearly between the two validations around the first crossing; a run stops at the
  first validation reaching the target;
* budget: ``max(10 epochs, 400 optimizer steps)`` (``budget_steps``; 10 epochs as the ladder, the
  400-step floor so that batch 8192, 7 steps per epoch, gets more than 70 steps); a run that does not
  reach the target within it is "not reached"; a run whose validation loss is not finite, or whose
  validation accuracy is at or below 15% from step 50 on, stops as "diverged" (neither reaches);
* schedule: linear warmup from 0 over 20 optimizer steps for every batch, then a constant LR
  (``LRSchedule(decay="constant", warmup_steps=20, warmup_start_factor=0)``, no batch scaling inside:
  the grid below gives absolute LRs); momentum 0.9 constant for every optimizer;
* batches (``BATCHES``): 128, 512, 2048, 8192; then 256, 1024, 4096 if compute allows (``EXTRA_BATCHES``);
* optimizers (``OPTIMIZERS``), hyperparameters other than the LR as the package's recipes:
  ``sgd``: Nesterov momentum SGD, weight decay 5e-4 on every parameter (the ladder's optimizer);
  ``kfac``: the ``kfac`` recipe's ``KFACFactory`` (empirical Fisher, factors and inverses refreshed
  every step as the recipe does, running average 0.05, damping 1e-3, KL clip 1e-3, BN by plain
  momentum, weight decay 5e-4) with ``KFACCallback``;
  ``lars``: the ``lars`` recipe's ``LARSFactory`` (trust coefficient 0.02, BN and biases outside the
  trust ratio and decay, weight decay 5e-4) with the recipe's momentum correction;
  ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.01, none on BN
  and biases: ``param_groups``);
  ``spngd``: the ``spngd`` recipe's ``KFACFactory`` (MC Fisher, fresh statistics, stale-statistics
  refresh with threshold 0.5, unit-wise BN, momentum correction, damping 1e-3, KL clip 1e-3);
* LR grid, on seed 0, per optimizer and batch, on the factor-2 lattice ``LR = LR_128[opt] x 2^k``
  (``LR_128``: sgd 0.1, lars 0.1, kfac 0.02, spngd 0.005 = the recipes' LRs per 256 halved, adamw 1e-3):
  at batch 128 the centre is ``k = 0``; at each next ladder batch (x4) the centre is the previous
  batch's chosen ``k`` plus 1 (LR x2: halfway, in log, between no scaling and the linear rule's x4;
  the square-root rule's x2); the extra batches take the mean of their neighbours' chosen ``k``
  (rounded down). Run the centre, then ``k + 1``, then ``k - 1``; while the best is at an edge of
  what was run, extend by one point beyond that edge (at most ``MAX_EXTENSIONS`` = 2 per batch; an
  edge point that diverged or did not reach is a worse neighbour, not an edge to extend). If no
  point reached, extend downwards when the largest LR diverged, upwards otherwise. The chosen ``k``
  is the fewest (interpolated) steps on seed 0, ties to the smaller LR (``best_over_lr``);
* seeds 1 and 2 run at seed 0's chosen LR (one run each per optimizer and batch), so each
  (optimizer, batch) costs 3-5 grid runs plus 2;
* order of the runs (``plan``), so that an incomplete study still answers the question: (1) sgd and
  kfac, seed 0 grids, batch by batch (128, 512, 2048, 8192; sgd then kfac at each); (2) sgd and kfac,
  seeds 1 and 2 at every batch; (3) lars, adamw, spngd likewise (grids, then seeds); (4) the extra
  batches 256, 1024, 4096 for every optimizer (grids, then seeds).

Analysis (``--report``):

* per optimizer, batch and seed the steps to the target (seed 0: the chosen LR's, the grid's
  minimum; seeds 1-2: at that LR); a batch enters an optimizer's fits only if all 3 seeds reached;
* ``B_crit`` of the least-squares fit ``S = S_min (1 + B_crit / B)`` (linear in ``1 / B``; three or
  more batches; ``fit_b_crit``) on the mean over seeds, and its spread: the three per-seed fits
  (min-max) and the 27 resamples of the seeds with replacement (the exact bootstrap, 10-90%); the
  knee of the ladder's x0.75 doubling rule (``ladder_knee``; on a x4 rung the ratio per doubling,
  ``(S(4B) / S(B)) ** 0.5``: ``knee_per_doubling``) as a model-free check on the full ladders;
* seed 0 was chosen on its own runs and sits lower by selection; the sensitivity fit on seeds 1-2
  alone is reported beside it;
* what counts: for a curvature method X, with ``r = B_crit(X) / B_crit(sgd)`` on the fits to the seed
  means and ``r_s`` the per-seed ratios (the same seed: the same initial weights and data order):
  **confirmed** if ``r >= 2`` and ``r_s >= 2`` on at least 2 of the 3 seeds; **refuted** if
  ``r < 2`` and ``r_s < 2`` on at least 2 of 3; otherwise (or without a fit for X or sgd)
  **inconclusive**. Reported for kfac and spngd separately; the hypothesis holds if it is confirmed
  for at least one of them, and the report says for which. Batches where an optimizer reached the
  target on fewer than 3 seeds are named, not dropped silently.

Cache: one JSON per run, ``benchmarks/results/critical_batch_optimizers/<opt>-<B>-k<k>-s<seed>.json``;
a cached run is never rerun, so the study resumes where it stopped. Usage::

    export PYTHONPATH=$PWD MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
    nohup python -m benchmarks.critical_batch_optimizers --run > /tmp/cbo.log 2>&1 &   # resumes
    python -m benchmarks.critical_batch_optimizers --report   # the .md and .png from the cache
    python -m benchmarks.critical_batch_optimizers --plan     # what would run next
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks import adaptive_batch as ab  # noqa: E402  (the ladder's machinery: data, recorder, fit, knee)

RESULTS = ROOT / "results" / "critical_batch_optimizers"
REPORT = ROOT / "results" / "critical_batch_optimizers.md"
PLOT = ROOT / "results" / "critical_batch_optimizers.png"
MODEL = "mlp-bn"
TARGET = ab.TARGETS[MODEL]
BATCHES = (128, 512, 2048, 8192)
EXTRA_BATCHES = (256, 1024, 4096)
SEEDS = (0, 1, 2)
FIRST = ("sgd", "kfac")  # the question's two sides, run first
LATER = ("lars", "adamw", "spngd")
OPTIMIZERS = FIRST + LATER
CURVATURE = ("kfac", "spngd")
LR_128 = {"sgd": 0.1, "lars": 0.1, "kfac": 0.02, "spngd": 0.005, "adamw": 1e-3}
WARMUP_STEPS = ab.CONST_WARMUP_STEPS  # 20
BUDGET_EPOCHS, BUDGET_MIN_STEPS = 10, 400
MAX_EXTENSIONS = 2
DIVERGED_ACC, DIVERGED_AFTER = 0.15, 50
HYPOTHESIS_RATIO = 2.0


def steps_per_epoch(batch: int, train_size: int = ab.TRAIN_SIZE) -> int:
    """Optimizer steps per epoch (the last, smaller batch is kept, as in the ladder)."""
    return math.ceil(train_size / batch)


def budget_steps(batch: int, train_size: int = ab.TRAIN_SIZE) -> int:
    """The step budget: ``max(10 epochs, 400 steps)``."""
    return max(BUDGET_EPOCHS * steps_per_epoch(batch, train_size), BUDGET_MIN_STEPS)


def lr_of(opt: str, k: int) -> float:
    """The grid's LR ``LR_128[opt] x 2^k``."""
    return LR_128[opt] * 2.0 ** k


def cell_name(opt: str, batch: int, k: int, seed: int) -> str:
    return f"{opt}-{batch}-k{k}-s{seed}"


def cell_path(opt: str, batch: int, k: int, seed: int) -> Path:
    return RESULTS / f"{cell_name(opt, batch, k, seed)}.json"


def load(opt: str, batch: int, k: int, seed: int) -> dict[str, Any] | None:
    path = cell_path(opt, batch, k, seed)
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Outcome:
    """One run's result as the planner sees it: steps to the target (None: not reached) and whether it diverged."""

    steps: float | None
    diverged: bool = False


Lookup = Callable[[str, int, int, int], Outcome | None]  # (opt, batch, k, seed) -> cached outcome or None


def choose_k(outcomes: dict[int, Outcome]) -> int | None:
    """The chosen grid point: fewest steps, ties to the smaller LR (``best_over_lr``); None if none reached."""
    steps, k = ab.best_over_lr({k: o.steps for k, o in outcomes.items()})
    return k if math.isfinite(steps) else None


def next_grid_k(centre: int, outcomes: dict[int, Outcome]) -> int | None:
    """The next grid point to run on seed 0 at one (optimizer, batch), or None when the grid is done.

    Centre, ``centre + 1``, ``centre - 1``; then, while the best is at an edge that itself
    reached the target (a diverged or not-reached edge is a worse neighbour), one more point beyond
    that edge, at most ``MAX_EXTENSIONS`` times. If nothing reached: downwards when the largest LR
    diverged, upwards otherwise.
    """
    for k in (centre, centre + 1, centre - 1):
        if k not in outcomes:
            return k
    if len(outcomes) >= 3 + MAX_EXTENSIONS:
        return None
    lo, hi = min(outcomes), max(outcomes)
    best = choose_k(outcomes)
    if best is None:
        return lo - 1 if outcomes[hi].diverged else hi + 1
    if best == hi:
        return hi + 1
    if best == lo:
        return lo - 1
    return None


def centre_k(opt: str, batch: int, chosen: Callable[[str, int], int | None]) -> int:
    """The grid's centre: 0 at 128; the previous ladder batch's choice + 1; extras: the neighbours' mean.

    ``chosen(opt, batch)`` gives the chosen ``k`` of a finished grid (None if nothing reached there).
    """
    if batch == BATCHES[0]:
        return 0
    if batch in BATCHES:
        prev = BATCHES[BATCHES.index(batch) - 1]
        k = chosen(opt, prev)
        # nothing reached at the previous batch: the linear rule from 128 (log2 of the batch ratio)
        return k + 1 if k is not None else round(math.log2(batch / BATCHES[0]))
    below, above = chosen(opt, batch // 2), chosen(opt, batch * 2)
    known = [k for k in (below, above) if k is not None]
    return math.floor(statistics.mean(known)) if known else round(math.log2(batch / BATCHES[0]))


def grid_outcomes(opt: str, batch: int, lookup: Lookup) -> dict[int, Outcome]:
    """Seed 0's cached grid at (opt, batch), over the lattice points that can be in it."""
    out = {}
    for k in range(-12, 16):
        o = lookup(opt, batch, k, 0)
        if o is not None:
            out[k] = o
    return out


def grid_choice(opt: str, batch: int, lookup: Lookup) -> tuple[bool, int | None]:
    """``(grid finished, chosen k)`` at (opt, batch): replays the planner over the cache."""
    centre = centre_k(opt, batch, lambda o, b: grid_choice(o, b, lookup)[1])
    outcomes = grid_outcomes(opt, batch, lookup)
    if next_grid_k(centre, outcomes) is not None:
        return False, None
    return True, choose_k(outcomes)


def plan(lookup: Lookup, optimizers: tuple[str, ...] = OPTIMIZERS,
         batches: tuple[int, ...] = BATCHES + EXTRA_BATCHES) -> tuple[str, int, int, int] | None:
    """The next run ``(opt, batch, k, seed)`` in the pre-registered order, or None when all are done.

    Phases: sgd+kfac seed-0 grids batch by batch; their seeds 1-2; lars/adamw/spngd grids, then their
    seeds; the extra batches for all (grids, then seeds). A grid depends on the previous batch's
    choice, so a phase moves to the next batch only when that grid is finished.
    """
    phases = [(FIRST, BATCHES), (LATER, BATCHES), (OPTIMIZERS, EXTRA_BATCHES)]
    for opts, bs in phases:
        opts = tuple(o for o in opts if o in optimizers)
        bs = tuple(b for b in bs if b in batches)
        for b in bs:  # grids on seed 0
            for opt in opts:
                done, _ = grid_choice(opt, b, lookup)
                if not done:
                    centre = centre_k(opt, b, lambda o, b2: grid_choice(o, b2, lookup)[1])
                    return opt, b, next_grid_k(centre, grid_outcomes(opt, b, lookup)), 0
        for opt in opts:  # seeds 1, 2 at the chosen LR
            for b in bs:
                _, k = grid_choice(opt, b, lookup)
                if k is None:
                    continue
                for seed in SEEDS[1:]:
                    if lookup(opt, b, k, seed) is None:
                        return opt, b, k, seed
    return None


_OUTCOMES: dict[Path, Outcome] = {}  # cached runs never change: read each file once


def cache_lookup(opt: str, batch: int, k: int, seed: int) -> Outcome | None:
    """The planner's view of the cache."""
    path = cell_path(opt, batch, k, seed)
    if path not in _OUTCOMES:
        r = load(opt, batch, k, seed)
        if r is None:
            return None
        _OUTCOMES[path] = Outcome(ab.steps_to_interpolated(r["curve"], TARGET), r.get("diverged", False))
    return _OUTCOMES[path]


# ---------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class AdamWFactory:
    """``torch.optim.AdamW`` with no weight decay on BN and biases (``param_groups``)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __call__(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.param_groups import param_groups

        return torch.optim.AdamW(param_groups(module, self.weight_decay), lr=self.lr, betas=self.betas, eps=self.eps)


def optimizer_setup(opt: str, lr: float) -> tuple[Any, list[Any], bool]:
    """``(optimizer factory, extra callbacks, LRSchedule momentum correction)`` for one optimizer at ``lr``."""
    from lightning_lbo import recipes
    from lightning_lbo.classifier import sgd_factory

    if opt == "sgd":
        return sgd_factory(lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True), [], False
    if opt == "lars":
        rec = recipes.lars(128, 1, 1)
        return recipes.LARSFactory(lr, trust_coefficient=rec.hyperparameters["trust_coefficient"]), [], True
    if opt == "adamw":
        return AdamWFactory(lr), [], False
    if opt in ("kfac", "spngd"):
        from lightning_lbo.callbacks import LRSchedule

        rec = getattr(recipes, opt)(128, 1, 1)  # the recipe's K-FAC configuration and its KFACCallback
        fields = {f: getattr(rec.optimizer, f) for f in rec.optimizer.__dataclass_fields__}
        callbacks = [cb for cb in rec.callbacks if not isinstance(cb, LRSchedule)]  # the schedule is ours
        return recipes.KFACFactory(**{**fields, "lr": lr}), callbacks, False
    raise ValueError(f"Invalid optimizer: {opt!r}. Supported: {OPTIMIZERS}.")


def divergence_stop():
    import pytorch_lightning as pl

    class DivergenceStop(pl.Callback):
        """Stop a run whose validation loss is not finite or whose accuracy stays at chance (>= step 50)."""

        def __init__(self) -> None:
            self.diverged_at: int | None = None

        def on_validation_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            if trainer.sanity_checking or "val_acc" not in metrics:
                return
            loss, acc = float(metrics.get("val_loss", 0.0)), float(metrics["val_acc"])
            if not math.isfinite(loss) or (trainer.global_step >= DIVERGED_AFTER and acc <= DIVERGED_ACC):
                self.diverged_at = trainer.global_step
                trainer.should_stop = True

    return DivergenceStop()


def run_cell(opt: str, batch: int, k: int, seed: int) -> dict[str, Any]:
    """One constant-LR run to the target; the ladder's data module and recorder."""
    import pytorch_lightning as pl

    from lightning_lbo.callbacks import LRSchedule
    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.critical_batch import StopAtTarget

    lr = lr_of(opt, k)
    factory, extra, correction = optimizer_setup(opt, lr)
    schedule = LRSchedule(decay="constant", warmup_steps=WARMUP_STEPS, warmup_start_factor=0.0, log=False,
                          momentum_correction=correction)
    stop, diverge, rec = StopAtTarget(TARGET, "val_acc"), divergence_stop(), ab.recorder()
    pl.seed_everything(seed, verbose=False)
    name, kwargs = ab.MODEL_SPECS[MODEL]
    module = ClassifierModule(name, optimizer=factory, model_kwargs=kwargs)
    dm = ab.datamodule(seed, resizable=False)
    dm.batch_size = batch
    train_size = ab.TRAIN_SIZE if ab.TRAIN_SUBSET is None else ab.TRAIN_SUBSET - 5000
    budget = budget_steps(batch, train_size)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=budget, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=0.25,
                         callbacks=[schedule, *extra, stop, diverge, rec])
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=dm)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"opt": opt, "batch": batch, "k": k, "lr": lr, "seed": seed, "steps": trainer.global_step,
            "budget_steps": budget, "reached_at": stop.reached_at, "diverged": diverge.diverged_at is not None,
            "diverged_at": diverge.diverged_at, "steps_to_target": ab.steps_to_interpolated(rec.curve, TARGET),
            "curve": rec.curve, "wall_s": wall, "cpu_s": cpu, "train_subset": ab.TRAIN_SUBSET}


def save(result: dict[str, Any], threads: int, load_before: float, load_after: float) -> None:
    path = cell_path(result["opt"], result["batch"], result["k"], result["seed"])
    result.update(model=MODEL, target=TARGET, threads=threads, load_before=load_before, load_after=load_after,
                  torch=torch.__version__, machine=f"{platform.processor() or platform.machine()}, "
                                                   f"{os.cpu_count()} cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    s = result["steps_to_target"]
    print(f"{path.stem}: LR {result['lr']:.4g}, " + (f"{s:.1f} steps to {TARGET:.0%}" if s is not None else
          ("diverged" if result["diverged"] else "not reached")) + f" ({result['steps']} steps run), "
          f"{result['wall_s']:.0f} s wall, load {load_before:.1f}", flush=True)


def run(optimizers: tuple[str, ...], batches: tuple[int, ...], max_runs: int | None) -> None:
    from benchmarks.bench_lock import bench_lock

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    done = 0
    while max_runs is None or done < max_runs:
        nxt = plan(cache_lookup, optimizers, batches)
        if nxt is None:
            print("plan finished", flush=True)
            return
        with bench_lock():  # one run, one thread: one of the two slots
            load_before = os.getloadavg()[0]
            result = run_cell(*nxt)
            load_after = os.getloadavg()[0]
        save(result, 1, load_before, load_after)
        done += 1


# ---------------------------------------------------------------------------------------------- analysis
def ladder(opt: str, lookup: Lookup, batches: tuple[int, ...]
           ) -> dict[int, dict[str, Any]]:
    """Per batch with a finished grid: the chosen k and LR, and the steps per seed at it (None: not reached/run)."""
    out = {}
    for b in batches:
        done, k = grid_choice(opt, b, lookup)
        if not done:
            continue
        per_seed = {}
        if k is not None:
            for s in SEEDS:
                o = lookup(opt, b, k, s)
                per_seed[s] = None if o is None else o.steps if o.steps is not None else math.inf
        out[b] = {"k": k, "lr": None if k is None else lr_of(opt, k), "steps": per_seed}
    return out


def complete_batches(lad: dict[int, dict[str, Any]], seeds: tuple[int, ...] = SEEDS) -> dict[int, list[float]]:
    """The batches where every seed in ``seeds`` ran and reached: ``{B: [steps per seed]}``."""
    return {b: [row["steps"][s] for s in seeds] for b, row in sorted(lad.items())
            if row["k"] is not None and all(row["steps"].get(s) is not None and math.isfinite(row["steps"][s])
                                            for s in seeds)}


def fit_line(steps: dict[int, float]) -> tuple[float, float]:
    """Least squares ``S = intercept + slope / B``: ``(intercept, slope)``, i.e. ``(S_min, S_min B_crit)``."""
    xs, ys = [1 / b for b in steps], list(steps.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def b_crit_of(steps: dict[int, float]) -> float | None:
    """``B_crit`` of the fit (as ``adaptive_batch.fit_b_crit``), with its degenerate cases named.

    None with fewer than 3 batches; ``math.inf`` when the steps fall like ``1 / B`` or faster over the
    whole range (slope > 0, intercept <= 0: no diminishing return seen, ``B_crit`` above the range);
    0 when they do not fall at all (slope <= 0: ``B_crit`` below the range).
    """
    if len(steps) < 3:
        return None
    fit = ab.fit_b_crit(steps)
    if fit is not None:
        return fit
    intercept, slope = fit_line(steps)
    return 0.0 if slope <= 0 else math.inf


def fits(per_batch: dict[int, list[float]]) -> dict[str, Any]:
    """``B_crit`` on the seed means, per seed, and over the exact bootstrap of the seeds (27 resamples)."""
    n = len(next(iter(per_batch.values()))) if per_batch else 0
    mean_fit = b_crit_of({b: statistics.mean(v) for b, v in per_batch.items()})
    per_seed = [b_crit_of({b: v[i] for b, v in per_batch.items()}) for i in range(n)]
    boot = sorted(x for draw in itertools.product(range(n), repeat=n)
                  if (x := b_crit_of({b: statistics.mean(v[i] for i in draw) for b, v in per_batch.items()}))
                  is not None)
    q = (lambda p: boot[min(len(boot) - 1, int(p * len(boot)))]) if boot else (lambda p: None)
    return {"mean": mean_fit, "per_seed": per_seed, "boot_10": q(0.1), "boot_90": q(0.9)}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` for B_crit values, None when undefined (missing, or both 0 or both infinite)."""
    if a is None or b is None or (a == b and (a == 0 or math.isinf(a))):
        return None
    if b == 0:
        return math.inf
    return a / b


def knee_per_doubling(means: dict[int, float]) -> tuple[list[tuple[int, int, float]], int | None]:
    """Per-doubling step ratios between consecutive ladder batches, and the knee.

    ``(B1, B2, (S(B2) / S(B1)) ** (1 / log2(B2 / B1)))`` per rung (``math.inf``: a side not reached);
    on a x2 ladder this is ``adaptive_batch.ladder_knee``'s ``S(2B) / S(B)``. The knee is the
    smallest ``B1`` from which no rung's per-doubling ratio is at or below ``KNEE_RATIO``.
    """
    bs = sorted(means)
    rows = []
    for b1, b2 in itertools.pairwise(bs):
        m1, m2 = means[b1], means[b2]
        per = (m2 / m1) ** (1 / math.log2(b2 / b1)) if math.isfinite(m1) and math.isfinite(m2) else math.inf
        rows.append((b1, b2, per))
    knee = next((b1 for i, (b1, _, _) in enumerate(rows) if all(r > ab.KNEE_RATIO for _, _, r in rows[i:])), None)
    return rows, knee


def verdict(ratio_mean: float | None, ratios_seed: list[float | None]) -> str:
    """The pre-registered rule: confirmed / refuted / inconclusive."""
    if ratio_mean is None or any(r is None for r in ratios_seed) or len(ratios_seed) < 3:
        return "inconclusive"
    above = sum(r >= HYPOTHESIS_RATIO for r in ratios_seed)
    if ratio_mean >= HYPOTHESIS_RATIO and above >= 2:
        return "confirmed"
    if ratio_mean < HYPOTHESIS_RATIO and len(ratios_seed) - above >= 2:
        return "refuted"
    return "inconclusive"


def why_missing(row: dict[str, Any]) -> str:
    """Why a batch with a finished grid is not in the fits."""
    if row["k"] is None:
        return "no LR reached on seed 0"
    unrun = [s for s in SEEDS if row["steps"].get(s) is None]
    if unrun:
        return "seeds " + ", ".join(map(str, unrun)) + " not run yet"
    return "not reached on seed " + ", ".join(str(s) for s in SEEDS if math.isinf(row["steps"][s]))


def fmt(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.{nd}f}"


def report(batches: tuple[int, ...] = BATCHES + EXTRA_BATCHES) -> str:
    lookup = cache_lookup
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = ["# Critical batch per optimizer (issue 25, item 4)", "",
             "Generated by `python -m benchmarks.critical_batch_optimizers --report` from the cache in "
             "`benchmarks/results/critical_batch_optimizers/` (one JSON per run). Protocol, hypothesis and "
             "the rule for a verdict: the runner's docstring, committed before the first run.", "",
             f"MLP-BN on Fashion-MNIST, target {TARGET:.0%} validation accuracy, warmup {WARMUP_STEPS} steps then "
             f"constant LR, budget max({BUDGET_EPOCHS} epochs, {BUDGET_MIN_STEPS} steps), LR grid on seed 0, "
             "seeds 1-2 at seed 0's LR.", ""]
    if not runs:
        return "\n".join(lines + ["No run cached yet."])
    loads = [r["load_before"] for r in runs]
    lines += [f"{len(runs)} runs cached, {sum(r['wall_s'] for r in runs) / 60:.0f} min of wall time in all, "
              f"torch threads {sorted({r['threads'] for r in runs})}, load average {min(loads):.1f}-"
              f"{max(loads):.1f}, torch {runs[0]['torch']}, {runs[0]['machine']}."]
    subsets = sorted({r.get("train_subset") for r in runs}, key=str)
    if subsets != [None]:
        lines.append(f"WARNING: smoke-test runs on a training subset are in the cache: {subsets}.")
    nxt = plan(lookup)
    lines += ["", "Next run in the plan: " + (cell_name(*nxt) if nxt else "none, the plan is complete") + ".", ""]
    lines += ["## Steps to the target", "",
              "Per optimizer and batch: the LR chosen on seed 0's grid (runs: LR -> steps; `div`: diverged, "
              "`nr`: not reached in the budget; `grid edge`: the best stayed at an edge after the "
              f"{MAX_EXTENSIONS} extensions, so a better LR may lie beyond), the steps of each seed at that LR, "
              "mean ± sd.", "",
              "| optimizer | batch | seed-0 grid | chosen LR | seed 0 | seed 1 | seed 2 | mean ± sd |",
              "|---|---|---|---|---|---|---|---|"]
    ladders, results = {}, {}
    for opt in OPTIMIZERS:
        lad = ladder(opt, lookup, batches)
        ladders[opt] = lad
        for b in sorted(set(batches)):
            grid = grid_outcomes(opt, b, lookup)
            if not grid:
                continue
            cells = ", ".join(f"{lr_of(opt, k):.3g} -> " + (fmt(o.steps) if o.steps is not None else
                                                              "div" if o.diverged else "nr")
                              for k, o in sorted(grid.items()))
            row = lad.get(b)
            if row is None:
                lines.append(f"| {opt} | {b} | {cells} (grid unfinished) | | | | | |")
                continue
            steps = [row["steps"].get(s) for s in SEEDS]
            shown = ["not run" if v is None else "nr" if math.isinf(v) else f"{v:.0f}" for v in steps]
            finite = [v for v in steps if v is not None and math.isfinite(v)]
            ms = (f"{statistics.mean(finite):.0f} ± {statistics.stdev(finite):.0f}" if len(finite) == 3 else
                  f"({len(finite)} seeds)")
            edge = row["k"] is not None and row["k"] in (min(grid), max(grid))  # the extension limit was hit
            chosen = (fmt(row["lr"], 4) + (" (grid edge)" if edge else "")) if row["lr"] else "none reached"
            lines.append(f"| {opt} | {b} | {cells} | {chosen} | "
                         + " | ".join(shown) + f" | {ms} |")
    lines += ["", "## Fitted critical batch", "",
              "`S = S_min (1 + B_crit / B)` by least squares in 1/B on the batches where all 3 seeds reached; "
              "spread: the per-seed fits and the exact bootstrap over seeds (10-90%); `inf`: no positive "
              "B_crit (steps still fall like 1/B over the range); 0: they do not fall.", "",
              "| optimizer | batches in the fit | B_crit (seed means) | per seed | bootstrap 10-90% | "
              "S_min | B_crit seeds 1-2 only | missing |",
              "|---|---|---|---|---|---|---|---|"]
    for opt in OPTIMIZERS:
        lad = ladders[opt]
        comp = complete_batches(lad)
        if not lad:
            lines.append(f"| {opt} | - | - | - | - | - | - | no finished grid |")
            continue
        f = fits(comp) if comp else {"mean": None, "per_seed": [], "boot_10": None, "boot_90": None}
        f12 = ab.fit_b_crit({b: statistics.mean(v[1:]) for b, v in comp.items()}) if comp else None
        s_min = None
        if len(comp) >= 3:
            s_min = fit_line({b: statistics.mean(v) for b, v in comp.items()})[0]
        missing = [f"{b} ({why_missing(lad[b])})" for b in batches if b in lad and b not in comp] + \
                  [f"{b} (grid unfinished)" for b in BATCHES if b not in lad]
        results[opt] = f
        lines.append(f"| {opt} | {', '.join(map(str, comp))} | {fmt(f['mean'])} | "
                     + ", ".join(fmt(x) for x in f["per_seed"]) + " | "
                     + (f"{fmt(f['boot_10'])}-{fmt(f['boot_90'])}" if f["boot_10"] is not None else "-") + " | "
                     + f"{fmt(s_min)} | {fmt(f12)} | {', '.join(missing) or '-'} |")
    seed0 = []
    for opt in OPTIMIZERS:  # while seeds 1-2 are missing: seed 0's own fit, not the pre-registered analysis
        steps = {b: row["steps"][0] for b, row in sorted(ladders[opt].items())
                 if row["k"] is not None and row["steps"].get(0) is not None and math.isfinite(row["steps"][0])}
        if len(steps) >= 3:
            seed0.append(f"{opt}: B_crit {fmt(b_crit_of(steps))} on {', '.join(map(str, steps))}, knee "
                         f"{knee_per_doubling(steps)[1] or 'none'}")
    if seed0:
        lines += ["", "Seed 0 alone (provisional: the grid's own minima, biased low by selection; not the "
                  "pre-registered analysis, which needs all 3 seeds): " + "; ".join(seed0) + "."]
    lines += ["", "## The hypothesis: a curvature method extends B_crit >= 2x over momentum SGD", ""]
    sgd = results.get("sgd")
    for opt in CURVATURE:
        cur = results.get(opt)
        if not sgd or not cur:
            lines.append(f"- {opt}: inconclusive (no fit yet for {'sgd' if not sgd else opt})")
            continue
        r = ratio(cur["mean"], sgd["mean"])
        rs = [ratio(a, b) for a, b in zip(cur["per_seed"], sgd["per_seed"], strict=False)]
        lines.append(f"- {opt}: B_crit {fmt(cur['mean'])} vs sgd {fmt(sgd['mean'])}, ratio {fmt(r, 2)}; per seed "
                     + ", ".join(fmt(x, 2) for x in rs) + f" -> **{verdict(r, rs)}**"
                     + (f" (the ratio rests on an infinite B_crit: {opt}'s steps fall like 1/B or faster somewhere "
                        "on the ladder and the fit's S_min is <= 0, so the law does not describe its ladder; "
                        "read the knee and the sensitivity fit beside it)" if cur["mean"] == math.inf else ""))
    post = []
    for opt in OPTIMIZERS:  # how much the verdict leans on the smallest batch
        comp = complete_batches(ladders[opt])
        rest = {b: statistics.mean(v) for b, v in comp.items() if b != BATCHES[0]}
        if len(rest) >= 3:
            post.append(f"{opt} {fmt(b_crit_of(rest))} (S_min {fmt(fit_line(rest)[0])})")
    if post:
        lines += ["", f"Sensitivity (post hoc, not part of the pre-registered verdict): the fit on the seed means "
                  f"without batch {BATCHES[0]}: " + "; ".join(post) + "."]
    lines += ["", "## Knee (model-free check)", "",
              f"Per-doubling ratio of the mean steps between consecutive batches (0.5: perfect scaling, 1: none); "
              f"the knee is the smallest batch from which no rung is at or below {ab.KNEE_RATIO} "
              "(`adaptive_batch.ladder_knee`'s rule on uneven rungs).", ""]
    for opt in OPTIMIZERS:
        comp = complete_batches(ladders[opt])
        means = {b: statistics.mean(v) for b, v in comp.items()}
        for b, row in ladders[opt].items():  # run on every seed, not reached on some (or no LR reached): inf
            if b not in means and (row["k"] is None or all(row["steps"].get(s) is not None for s in SEEDS)):
                means[b] = math.inf
        if len(means) < 2:
            continue
        rows, knee = knee_per_doubling(means)
        lines.append(f"- {opt}: " + "; ".join(f"{b1}->{b2}: x{fmt(r, 2)}" for b1, b2, r in rows)
                     + f"; knee {knee or 'none (the last rung still scales)'}")
    lines += ["", f"![steps to target against batch]({PLOT.name})", ""]
    plot(ladders, results)
    return "\n".join(lines)


def plot(ladders: dict[str, dict[int, dict[str, Any]]], results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = dict(zip(OPTIMIZERS, ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple"), strict=True))
    for opt, lad in ladders.items():
        comp = complete_batches(lad)
        if comp:
            bs = list(comp)
            means = [statistics.mean(v) for v in comp.values()]
            lo = [m - min(v) for m, v in zip(means, comp.values(), strict=True)]
            hi = [max(v) - m for m, v in zip(means, comp.values(), strict=True)]
            bc = results.get(opt, {}).get("mean")
            ax.errorbar(bs, means, yerr=[lo, hi], marker="o", color=colors[opt], capsize=3, ls="none",
                        label=f"{opt} (B_crit {fmt(bc)})")
            if len(bs) >= 3:
                intercept, slope = fit_line(dict(zip(bs, means, strict=True)))
                grid = [2 ** (i / 8) for i in range(8 * 7, 8 * 13 + 1)]
                ax.plot(grid, [intercept + slope / g for g in grid], color=colors[opt], lw=1)
        partial = [(b, v) for b, row in lad.items() if b not in comp  # single seeds of incomplete batches
                   for v in row["steps"].values() if v is not None and math.isfinite(v)]
        if partial:
            ax.plot(*zip(*partial, strict=True), marker="x", ls="none", color=colors[opt], alpha=0.5,
                    label=f"{opt}: single seeds (batch incomplete)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"optimizer steps to {TARGET:.0%} validation accuracy")
    ax.set_title("MLP-BN, constant LR tuned per batch: mean over 3 seeds (bars: min-max), fit")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    global RESULTS, REPORT, PLOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the plan from the cache (resumes)")
    parser.add_argument("--report", action="store_true", help="write the report and plot from the cache")
    parser.add_argument("--plan", action="store_true", help="print the next run")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES + EXTRA_BATCHES))
    parser.add_argument("--max-runs", type=int, default=None)
    parser.add_argument("--train-subset", type=int, default=None, help="first N images (smoke tests only)")
    parser.add_argument("--results", default=None, help="cache directory (smoke tests)")
    args = parser.parse_args()
    if args.results:
        RESULTS = Path(args.results)
        REPORT, PLOT = RESULTS / "report.md", RESULTS / "plot.png"
    ab.TRAIN_SUBSET = args.train_subset
    if args.plan:
        nxt = plan(cache_lookup, tuple(args.optimizers), tuple(args.batches))
        print(cell_name(*nxt) if nxt else "plan complete")
    if args.run:
        run(tuple(args.optimizers), tuple(args.batches), args.max_runs)
    if args.report:
        text = report()
        REPORT.write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
