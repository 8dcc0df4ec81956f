"""The large-batch study (issue 15): a resumable grid of training runs, one JSON per finished run.

Every run is one ``lbo compare`` training (:func:`lightning_lbo.compare.run_one`, in a fresh child
process): Fashion-MNIST with ``--val-size`` (default 5000) training images held out for choosing the
learning rate, the rest for training, and the 10k test split evaluated once after training. Each
finished run is cached as ``<results>/<key>.json`` (key: model, recipe[+variant], batch, epochs, base LR,
seed), so the grid grows over several sessions and a rerun trains only what is missing. Every run passes
all its recipe's keyword arguments explicitly (:data:`STUDY_RECIPE_KWARGS`, frozen at the recipes' defaults
of the cache's start), so a later change of a recipe default moves neither the grid nor the cache; a run
is reused only while the hyperparameters its recipe builds from them are unchanged.

The plan, most informative first (each step waits for what it needs from the steps above):

1. breadth first over the baseline (``sgd`` at the first batch of ``--batches``, 128) and every
   recipe at the next two batches (2048, 8192), in the order of ``--recipes``: each recipe's
   scaling-rule LR (its frozen grid centre), then half and double;
2. the LR grids of the baseline and at 2048 grown to 4-5 log-spaced values (factor 2 apart): one
   or two more steps outwards where the best LR sits on the edge of the grid;
3. the baseline's best LR with seeds 1 and 2, then the ``--top`` best recipes at 2048 (seeds wait
   for a complete LR grid);
4. the ablations (:data:`VARIANTS`: SP-NGD's ingredients switched one at a time, K-FAC with stale
   statistics) at their parent recipe's best LR, at 8192 then 2048, once the parent's LR grid there
   is complete;
5. the grids at 8192 completed, its top recipes' seeds, then seeds 1 and 2 of the ``--seed-variants``;
6. short grids (3 LRs: centre, half, double) of the ``--headline-recipes`` at the remaining batches
   (512), then of the second model's headline cells (``--headline-model``, at its own epoch budget;
   its best LRs with 3 seeds);
7. the remaining batches' full grids, then every recipe's best cell with 3 seeds.

Selection uses the final held-out accuracy of seed 0; the test split is never used for it.
``--until HH:MM`` (UTC) stops starting new runs at that time; ``--dry-run`` prints the next runs.
Every run holds the shared benchmark lock (:mod:`benchmarks.bench_lock`) so that other studies on
the machine interleave run by run. ``python benchmarks/report.py`` regenerates REPORT.md from the cache.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 nice -n 5 python benchmarks/study.py --until 10:45
    python benchmarks/study.py --accelerator gpu --threads 0 --headline-epochs 10   # on a GPU machine
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "study"
if str(HERE.parent) not in sys.path:  # `python benchmarks/study.py` from the repository root
    sys.path.insert(0, str(HERE.parent))

RECIPES = ("sgd", "goyal", "lars", "lamb", "akiba", "kfac", "spngd")
LR_FACTOR = 2.0  # spacing of the LR grid (log-spaced, factor 2)
MIN_LRS, MAX_LRS = 4, 5  # LR values per (recipe, batch): at least 4, a 5th where the best is on the edge
HEADLINE_LRS = 3  # the short grids (second model, batch 512): centre, half, double
SEEDS = (0, 1, 2)
CLAIM_POLL_SECONDS = 15.0  # a runner whose remaining cells are all claimed by another runner waits this long

#: Ablations, run at the parent recipe's best LR: name -> (parent recipe, recipe keyword overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # goal 4's refresh share: the relative change of a fresh MC estimate of G (and of the unit-wise BN
    # Fisher) between two refreshes is 0.25-0.75 at batch 2048 (benchmarks/stale_trace.py), above the
    # default threshold 0.1, so those statistics never go stale; larger thresholds, first
    "t0.5": ("spngd", {"stale_threshold": 0.5}),
    "t1": ("spngd", {"stale_threshold": 1.0}),
    "stale1": ("kfac", {"stale_threshold": 1.0}),
    "stale0.5": ("kfac", {"stale_threshold": 0.5}),
    "t0.3": ("spngd", {"stale_threshold": 0.3}),
    "poly2": ("spngd", {"power": 2.0}),  # K-FAC's decay instead of poly(3.5)
    "fresh": ("spngd", {"stale_threshold": None}),  # SP-NGD refreshing every statistic every step
    "avgfactors": ("spngd", {"factor_decay": 0.05}),
    "empfisher": ("spngd", {"fisher": "empirical"}),
    "plainbn": ("spngd", {"unit_wise_bn": False}),
    "stale": ("kfac", {"stale_threshold": 0.1}),  # K-FAC with SP-NGD's stale statistics (goal 4)
}

#: Every recipe keyword argument the study passes explicitly (its grid centre ``base_lr`` included):
#: the defaults of :mod:`lightning_lbo.recipes` when the cache was started (2026-11-30). Frozen here so
#: that the recipes' defaults can move to the study's tuned values without moving the grid or
#: retraining the cache; a run trains ``{**STUDY_RECIPE_KWARGS[recipe], "base_lr": lr, **variant}``.
STUDY_RECIPE_KWARGS: dict[str, dict[str, Any]] = {
    "sgd": dict(base_lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=None, nesterov=True),
    "goyal": dict(base_lr=0.1, momentum=0.9, weight_decay=1e-4, warmup_epochs=None, nesterov=True),
    "lars": dict(base_lr=0.1, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, warmup_epochs=None,
                 power=2.0),
    "lamb": dict(base_lr=0.005, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, warmup_epochs=None, power=1.0),
    "akiba": dict(base_lr=0.1, lr_rmsprop=3e-4, momentum=0.9, weight_decay=1e-4),
    "kfac": dict(base_lr=0.02, momentum=0.9, weight_decay=5e-4, damping=1e-3, warmup_epochs=None,
                 stale_threshold=None),
    "spngd": dict(base_lr=0.02, momentum=0.9, weight_decay=5e-4, damping=1e-3, stale_threshold=0.1,
                  warmup_epochs=None, fisher="mc", factor_decay=1.0, power=3.5, unit_wise_bn=True),
}


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    model: str
    recipe: str
    batch: int
    epochs: int
    base_lr: float
    seed: int = 0
    variant: str = ""

    @property
    def name(self) -> str:
        return self.recipe + (f"+{self.variant}" if self.variant else "")

    @property
    def key(self) -> str:
        return f"{self.model}-{self.name}-b{self.batch}-e{self.epochs}-lr{self.base_lr:.4g}-s{self.seed}"

    def recipe_kwargs(self) -> dict[str, Any]:
        extra = VARIANTS[self.variant][1] if self.variant else {}
        return {**STUDY_RECIPE_KWARGS[self.recipe], "base_lr": self.base_lr, **extra}


@dataclass
class StudyConfig:
    """What the study trains (see the module docstring for the order)."""

    model: str = "mlp-bn"
    recipes: tuple[str, ...] = RECIPES
    batches: tuple[int, ...] = (128, 2048, 8192, 512)  # the first is the baseline's; the rest in priority order
    epochs: int = 10
    headline_model: str = "cnn"
    headline_recipes: tuple[str, ...] = ("sgd", "lars", "kfac")
    headline_epochs: int = 4
    variants: tuple[str, ...] = tuple(VARIANTS)
    seed_variants: tuple[str, ...] = ()  # variants also rerun with seeds 1 and 2 (after the 8192 seeds)
    top: int = 3
    val_size: int = 5000
    train_subset: int = 0
    data_dir: str | None = None
    threads: int = 1
    accelerator: str = "cpu"
    results: Path = RESULTS

    @property
    def baseline(self) -> int:
        return self.batches[0]


def grid_centre(recipe: str) -> float:
    """The ``base_lr`` the LR grid is centred on (the scaling rule's prediction, frozen in STUDY_RECIPE_KWARGS)."""
    return float(STUDY_RECIPE_KWARGS[recipe]["base_lr"])


def hyperparameters(cell: Cell, steps_per_epoch: int) -> dict[str, Any]:
    from lightning_lbo.recipes import build_recipe

    hp = build_recipe(cell.recipe, cell.batch, cell.epochs, steps_per_epoch, **cell.recipe_kwargs()).hyperparameters
    return json.loads(json.dumps(hp, default=str))


def train_images(config: StudyConfig) -> int:
    return (config.train_subset or 60000) - config.val_size


def steps_per_epoch(config: StudyConfig, batch: int) -> int:
    return train_images(config) // batch  # drop_last: every step sees a full batch


# ----------------------------------------------------------------------------------------------- cache


class Cache:
    """The finished runs under ``config.results`` (one JSON each), reloaded after every run."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.records: dict[str, dict[str, Any]] = {}
        self._hyperparameters: dict[str, dict[str, Any]] = {}  # per cell key: what the recipe would use now
        self.reload()

    def reload(self) -> None:
        self.records = {}
        if self.config.results.is_dir():
            for path in sorted(self.config.results.glob("*.json")):
                record = json.loads(path.read_text())
                self.records[path.stem] = record

    def get(self, cell: Cell) -> dict[str, Any] | None:
        """The cached record of ``cell`` when its hyperparameters are still the recipe's (else None).

        A failed run counts once it failed twice (a crash of the machine or a broken checkout is
        retried once; a configuration that fails again is a result).
        """
        record = self.records.get(cell.key)
        if record is None:
            return None
        if cell.key not in self._hyperparameters:
            self._hyperparameters[cell.key] = hyperparameters(cell, steps_per_epoch(self.config, cell.batch))
        if record["hyperparameters"] != self._hyperparameters[cell.key]:
            return None
        if record["result"].get("error") and record.get("attempts", 1) < 2:
            return None
        return record


def score(record: dict[str, Any]) -> float:
    """Selection score: final held-out accuracy; a failed or diverged run scores 0."""
    result = record["result"]
    acc = result.get("final_acc")
    if result.get("error") or acc is None or not math.isfinite(acc):
        return 0.0
    return float(acc)


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Tune:
    """The LR grid of one (model, recipe[, variant], batch) on seed 0."""

    model: str
    recipe: str
    batch: int
    epochs: int
    variant: str = ""
    center: float | None = None  # default: grid_centre(recipe) (the scaling rule's prediction)
    fixed: bool = False  # only the centre (the ablations, at their parent's best LR)

    def cell(self, lr: float, seed: int = 0) -> Cell:
        return Cell(self.model, self.recipe, self.batch, self.epochs, _round_lr(lr), seed, self.variant)

    def tried(self, cache: Cache) -> dict[float, float]:
        """{base LR: score} of the cached seed-0 runs of this grid."""
        found = {}
        prefix = f"{self.model}-{self.cell(1.0).name}-b{self.batch}-e{self.epochs}-lr"
        for key in cache.records:
            if key.startswith(prefix) and key.endswith("-s0"):
                lr = float(key[len(prefix):-3])
                record = cache.get(self.cell(lr))
                if record is not None:
                    found[lr] = score(record)
        return found

    @property
    def centre(self) -> float:
        return self.center if self.center is not None else grid_centre(self.recipe)

    def proposal(self, cache: Cache, budget: int) -> Cell | None:
        """The next LR to try when fewer than ``budget`` were tried, or None."""
        center = self.centre
        tried = self.tried(cache)
        if self.fixed:  # one run at the given centre (an ablation may run at several parents' LRs)
            return None if _round_lr(center) in tried else self.cell(center)
        if len(tried) >= min(budget, MAX_LRS):
            return None
        for lr in (center, center / LR_FACTOR, center * LR_FACTOR):
            if _round_lr(lr) not in tried:
                return self.cell(lr)
        lrs = sorted(tried)
        best = self.best(cache)
        if best == lrs[0]:
            return self.cell(lrs[0] / LR_FACTOR)
        if best == lrs[-1]:
            return self.cell(lrs[-1] * LR_FACTOR)
        if len(lrs) >= MIN_LRS:
            return None  # the best LR is inside a grid of 4 or more
        lower_side = tried[lrs[0]] >= tried[lrs[-1]]
        return self.cell(lrs[0] / LR_FACTOR if lower_side else lrs[-1] * LR_FACTOR)

    def done(self, cache: Cache) -> bool:
        return self.proposal(cache, MAX_LRS) is None

    def best(self, cache: Cache) -> float | None:
        """The best seed-0 LR tried so far (None before the first); ties go to the LR nearest the centre."""
        tried = self.tried(cache)
        return max(sorted(tried), key=lambda lr: (tried[lr], -abs(math.log(lr / self.centre)))) if tried else None


def _round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


def _seed_cells(grid: Tune, cache: Cache, lrs: int | None = None) -> list[Cell]:
    """Seeds 1, 2 at the best LR once the LR grid is complete, or has ``lrs`` values (a short grid)."""
    best = grid.best(cache)
    ready = grid.done(cache) if lrs is None else len(grid.tried(cache)) >= lrs
    return [grid.cell(best, seed) for seed in SEEDS[1:]] if best is not None and ready else []


def plan(config: StudyConfig, cache: Cache) -> Iterator[Cell]:
    """Every missing run whose prerequisites are cached, most informative first (see the docstring)."""
    model, epochs = config.model, config.epochs
    early = config.batches[:3]  # baseline, then the two batches of the goals (2048, 8192)

    def grids(batch: int) -> list[Tune]:
        names = ["sgd"] if batch == config.baseline else list(config.recipes)
        return [Tune(model, r, batch, epochs) for r in names]

    def round_robin(tunes: Sequence[Tune], budgets: Sequence[int] = (1, 3, MIN_LRS, MAX_LRS)) -> Iterator[Cell]:
        for budget in budgets:
            for grid in tunes:
                cell = grid.proposal(cache, budget)
                if cell is not None:
                    yield cell

    def top_seeds(batch: int, k: int) -> Iterator[Cell]:
        tunes = [g for g in grids(batch) if g.tried(cache)]
        tunes.sort(key=lambda g: -max(g.tried(cache).values()))
        for grid in tunes[:k]:
            yield from _seed_cells(grid, cache)

    def variants(batch: int) -> Iterator[Cell]:
        for name in config.variants:
            parent = Tune(model, VARIANTS[name][0], batch, epochs)
            lr = parent.best(cache)
            if parent.recipe in config.recipes and lr is not None and parent.tried(cache):
                yield from round_robin([Tune(model, parent.recipe, batch, epochs, name, center=lr, fixed=True)])

    # breadth first: every recipe's scaling-rule LR, then half and double, at the goals' batches
    yield from round_robin([g for b in early for g in grids(b)], (1, 3))
    yield from round_robin([g for b in early[:2] for g in grids(b)], (MIN_LRS, MAX_LRS))
    for grid in grids(config.baseline):
        yield from _seed_cells(grid, cache)
    if len(early) > 1:
        yield from top_seeds(early[1], config.top)
    for batch in reversed(early[1:]):  # the ablations at 8192 (goal 4) first, after their parents' LR grids
        parents = dict.fromkeys(VARIANTS[name][0] for name in config.variants if VARIANTS[name][0] in config.recipes)
        yield from round_robin([Tune(model, parent, batch, epochs) for parent in parents], (MIN_LRS, MAX_LRS))
        yield from variants(batch)
    yield from round_robin([g for b in early[2:] for g in grids(b)], (MIN_LRS, MAX_LRS))
    for batch in early[2:]:
        yield from top_seeds(batch, config.top)
    for batch in reversed(early[1:]):
        for name in config.seed_variants:
            parent = Tune(model, VARIANTS[name][0], batch, epochs)
            lr = parent.best(cache)
            variant = Tune(model, parent.recipe, batch, epochs, name, center=lr, fixed=True)
            if lr is not None and parent.recipe in config.recipes and _round_lr(lr) in variant.tried(cache):
                yield from (variant.cell(lr, seed) for seed in SEEDS[1:])
    # the middle of the accuracy-vs-batch curve (512): the headline recipes with 3 LRs each
    for batch in config.batches[3:]:
        yield from round_robin([Tune(model, r, batch, epochs) for r in config.headline_recipes
                                if r in config.recipes], (1, HEADLINE_LRS))
    if config.headline_model and len(config.batches) > 1:  # the second model: 3 LRs, then the best with 3 seeds
        head = [Tune(config.headline_model, r, b, config.headline_epochs)
                for b in config.batches[:2] for r in (["sgd"] if b == config.baseline else config.headline_recipes)]
        yield from round_robin(head, (1, HEADLINE_LRS))
        for grid in head:
            yield from _seed_cells(grid, cache, HEADLINE_LRS)
    for batch in config.batches[3:]:
        yield from round_robin(grids(batch))
        yield from top_seeds(batch, config.top)
        yield from variants(batch)
    for batch in config.batches[1:]:
        yield from top_seeds(batch, len(config.recipes))


def next_cell(config: StudyConfig, cache: Cache, skip: Container[str] = ()) -> Cell | None:
    """The first missing cell of the plan whose key is not in ``skip``."""
    return next((cell for cell in plan(config, cache) if cell.key not in skip and cache.get(cell) is None), None)


def claims_dir(config: StudyConfig) -> Path:
    """Where runners sharing ``config.results`` mark the cells they are training (outside the cache).

    Under ``$LBO_STUDY_CLAIMS`` (default: the temporary directory), one folder per cache directory.
    """
    digest = hashlib.sha1(str(config.results.resolve()).encode()).hexdigest()[:12]
    return Path(os.environ.get("LBO_STUDY_CLAIMS") or tempfile.gettempdir()) / f"lbo-study-claims-{digest}"


def claim(config: StudyConfig, cell: Cell) -> Path | None:
    """Mark ``cell`` as being trained by this process; None when another live runner has it.

    Two runners on one cache (one per free benchmark slot) so train disjoint cells; a claim left by a
    runner that died is taken over.
    """
    path = claims_dir(config) / f"{cell.key}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                return None
            path.unlink(missing_ok=True)  # its runner died
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------- running


def _host() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}}


def train(cell: Cell, config: StudyConfig, runner: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Train ``cell`` (in a child process unless ``runner`` is given) and write its JSON record."""
    from benchmarks.bench_lock import bench_lock
    from lightning_lbo.compare import RunSpec, _run_in_child

    spe = steps_per_epoch(config, cell.batch)
    hp = hyperparameters(cell, spe)
    every = max(1, spe // 4)  # validate ~4 times per epoch (every step at large batch)
    spec = RunSpec(cell.recipe, cell.batch, cell.epochs, recipe_kwargs=cell.recipe_kwargs(), model=cell.model,
                   seed=cell.seed, eval_every=every, threads=config.threads, progress=False,
                   train_subset=config.train_subset or None, data_dir=config.data_dir, val_size=config.val_size,
                   test=True, accelerator=config.accelerator)
    asked = time.time()
    with bench_lock():
        load_before, start = os.getloadavg()[0], time.time()
        try:
            result = asdict((runner or _run_in_child)(spec))
        except Exception as err:  # recorded: a diverged or crashed configuration is a result too
            result = {"recipe": cell.recipe, "batch_size": cell.batch, "error": f"{type(err).__name__}: {err}",
                      "history": []}
        end = time.time()
    record = {"cell": asdict(cell), "recipe_kwargs": cell.recipe_kwargs(), "hyperparameters": hp, "result": result,
              "eval_every": every, "steps_per_epoch": spe, "val_size": config.val_size,
              "train_images": train_images(config), "threads": config.threads, "accelerator": config.accelerator,
              "wall_seconds": end - start, "lock_wait_seconds": start - asked, "load_before": load_before,
              "load_after": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "host": _host()}
    config.results.mkdir(parents=True, exist_ok=True)
    path = config.results / f"{cell.key}.json"
    if path.exists() and result.get("error"):  # count consecutive failures of this cell
        before = json.loads(path.read_text())
        record["attempts"] = before.get("attempts", 1) + 1 if before["result"].get("error") else 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # atomic: an interrupted run leaves no half-written record
    return record


def run_study(config: StudyConfig, until: float | None = None, max_runs: int | None = None,
              runner: Callable[[Any], Any] | None = None, log: Callable[[str], None] = print) -> int:
    """Train missing cells in plan order until none is left, ``until`` (epoch seconds) or ``max_runs``."""
    cache = Cache(config)
    runs = 0
    taken: set[str] = set()  # cells another runner is training
    while max_runs is None or runs < max_runs:
        if until is not None and time.time() >= until:
            log("stopping: --until reached")
            break
        cell = next_cell(config, cache, taken)
        if cell is None:
            if not taken:
                log("nothing left to train")
                break
            time.sleep(CLAIM_POLL_SECONDS)  # only cells of another runner are left: their results may add more
            taken.clear()
            cache.reload()
            continue
        mine = claim(config, cell)
        if mine is None:
            taken.add(cell.key)
            continue
        log(f"== {cell.key}")
        try:
            record = train(cell, config, runner)
        finally:
            mine.unlink(missing_ok=True)
        taken.clear()
        res = record["result"]
        error = f", error {res['error']}" if res.get("error") else ""
        log(f"   held-out {res.get('final_acc')}, test {res.get('test_acc')}, {record['wall_seconds']:.0f} s "
            f"(waited {record['lock_wait_seconds']:.0f} s for the lock){error}")
        runs += 1
        cache.reload()
    return runs


# ------------------------------------------------------------------------------------------------- CLI


def _csv(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    return parse


def _until(text: str) -> float:
    """``HH:MM`` (UTC, today; tomorrow if already past) as epoch seconds."""
    try:
        hours, minutes = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use HH:MM (UTC)") from None
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise argparse.ArgumentTypeError(f"{text!r}: use HH:MM (UTC)")
    now = time.gmtime()
    target = calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0))
    return target if target > time.time() - 60 else target + 86400


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp-bn", help="model of the full grid (lbo compare --model; default mlp-bn)")
    p.add_argument("--recipes", type=_csv(str), default=RECIPES, help="comma-separated (default: all seven)")
    p.add_argument("--batches", type=_csv(int), default=(128, 2048, 8192, 512),
                   help="the baseline's batch first, then the others in priority order (default 128,2048,8192,512)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every run of the full grid (default 10)")
    p.add_argument("--headline-model", default="cnn", help="second model, headline cells only ('' for none)")
    p.add_argument("--headline-recipes", type=_csv(str), default=("sgd", "lars", "kfac"),
                   help="recipes of the second model at the second batch (default sgd,lars,kfac)")
    p.add_argument("--headline-epochs", type=int, default=4, help="epochs of the second model's runs (default 4)")
    p.add_argument("--variants", type=_csv(str), default=tuple(VARIANTS),
                   help=f"ablations (default all: {','.join(VARIANTS)})")
    p.add_argument("--seed-variants", type=_csv(str), default=(),
                   help="variants also rerun with seeds 1 and 2 at their parent's best LR (default none)")
    p.add_argument("--top", type=int, default=3, help="recipes per batch rerun with 3 seeds first (default 3)")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for LR selection")
    p.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0: all 60000)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: lbo data's search)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default; default 1)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "cuda", "mps", "auto"),
                   help="Lightning accelerator of every run (default cpu)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"cache directory (default {RESULTS})")
    p.add_argument("--until", type=_until, default=None, help="HH:MM UTC: start no run after this time")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--dry-run", action="store_true", help="print the runs the plan would start next")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    from lightning_lbo.compare import MODELS
    from lightning_lbo.recipes import RECIPES as FUNCTIONS

    unknown = [r for r in (*args.recipes, *args.headline_recipes) if r not in FUNCTIONS]
    if unknown:
        raise SystemExit(f"Unknown recipe(s): {', '.join(unknown)}. Available: {', '.join(FUNCTIONS)}.")
    for model in (args.model, args.headline_model):
        if model and model not in MODELS:
            raise SystemExit(f"Unknown model {model!r}. Available: {', '.join(MODELS)}.")
    bad = [v for v in (*args.variants, *args.seed_variants) if v not in VARIANTS]
    if bad:
        raise SystemExit(f"Unknown variant(s): {', '.join(bad)}. Available: {', '.join(VARIANTS)}.")
    if args.epochs < 1 or args.headline_epochs < 1 or min(args.batches) < 1 or args.val_size < 0:
        raise SystemExit("--epochs, --headline-epochs and every batch must be positive, --val-size >= 0.")
    config = StudyConfig(model=args.model, recipes=tuple(args.recipes), batches=tuple(args.batches),
                         epochs=args.epochs, headline_model=args.headline_model,
                         headline_recipes=tuple(args.headline_recipes), headline_epochs=args.headline_epochs,
                         variants=tuple(args.variants), seed_variants=tuple(args.seed_variants), top=args.top,
                         val_size=args.val_size,
                         train_subset=args.train_subset, data_dir=args.data_dir, threads=args.threads,
                         accelerator=args.accelerator, results=args.results)
    too_big = [b for b in config.batches if b > train_images(config)]
    if too_big:
        raise SystemExit(f"Batch size(s) {too_big} exceed the {train_images(config)} training images "
                         "(--train-subset minus --val-size): lower them.")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.dry_run:
        cache = Cache(config)
        missing = [cell.key for cell in plan(config, cache) if cache.get(cell) is None]
        print("\n".join(dict.fromkeys(missing)) or "nothing left to train (given what is cached)")
        return 0
    run_study(config, until=args.until, max_runs=args.max_runs, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
