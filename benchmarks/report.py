"""Generate benchmarks/REPORT.md and its plots from the study's cache (``benchmarks/study.py``).

Reads every run cached in ``benchmarks/results/study/`` (nothing is trained here) and writes:

* ``benchmarks/REPORT.md``: setup (machine, threads, allocator, wall time), the goals with the
  hand-written reading of ``benchmarks/results/study_notes.md`` below them, the tuned baseline and how
  close it is to its plateau, test accuracy against batch per recipe (mean and standard deviation
  over seeds), the LR grids, steps to the target, the SP-NGD ablation, goals 1-4 of issue 15 with
  the measured figures, and the cells still missing;
* ``benchmarks/results/error_vs_batch.png``: test error against batch size per recipe, the
  baseline's band, and marks where the papers' batch/data-set ratios fall at Fashion-MNIST's size
  (the analogue of Goyal et al.'s Figure 1);
* ``benchmarks/results/curves/``: held-out accuracy against optimizer steps and wall time of every
  recipe's chosen cell at each batch (``accuracy.png``, ``results.csv``, ``history.csv``).

Usage::

    python benchmarks/report.py            # after (or while) benchmarks/study.py runs
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python benchmarks/report.py` from the repository root
    sys.path.insert(0, str(HERE.parent))

from benchmarks.study import RESULTS, VARIANTS, Cache, Cell, StudyConfig, Tune, plan, score  # noqa: E402

REPORT = HERE / "REPORT.md"
PLOTS = HERE / "results"
NOTES = PLOTS / "study_notes.md"  # hand-written reading of the figures (dated), included verbatim
HISTORY = "### History"  # the notes' section of superseded readings, moved to the end of the report
FASHION_MNIST = 60000
FIRST_ORDER = ("sgd", "goyal", "lars", "lamb", "akiba")
GOAL_BATCH, BEYOND_BATCH = 2048, 8192


@dataclass
class Chosen:
    """The best LR of one (model, recipe[+variant], batch) and its runs at that LR (one per seed)."""

    model: str
    name: str
    batch: int
    lr: float
    grid: dict[float, float]  # seed-0 held-out accuracy per base LR
    runs: list[dict[str, Any]] = field(default_factory=list)

    def _values(self, key: str) -> list[float]:
        return [float(r["result"].get(key, math.nan)) if not r["result"].get("error") else math.nan for r in self.runs]

    @property
    def test(self) -> list[float]:
        return self._values("test_acc")

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test)

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.runs) > 1 else math.nan

    @property
    def heldout_mean(self) -> float:
        """Mean final held-out accuracy over the seeds: what chooses between recipes (never the test split)."""
        return statistics.fmean(score(r) for r in self.runs)

    @property
    def seed0(self) -> dict[str, Any]:
        return self.runs[0]


def collect(cache: Cache, model: str, epochs: int) -> dict[tuple[str, int], Chosen]:
    """The best-LR cell of every (recipe[+variant], batch) of ``model`` that has a seed-0 run."""
    names = {(r["cell"]["recipe"], r["cell"]["variant"], r["cell"]["batch"]) for r in cache.records.values()
             if r["cell"]["model"] == model and r["cell"]["epochs"] == epochs}
    cells = {}
    for recipe, variant, batch in sorted(names):
        tune = Tune(model, recipe, batch, epochs, variant)
        grid = tune.tried(cache)
        best = tune.best(cache)
        if best is None:
            continue
        runs = [cache.get(tune.cell(best, seed)) for seed in range(3)]
        name = recipe + (f"+{variant}" if variant else "")
        cells[(name, batch)] = Chosen(model, name, batch, best, grid, [r for r in runs if r is not None])
    return cells


def first_step(history: Sequence[Sequence[float]], target: float) -> int | None:
    from lightning_lbo.compare import reach_target

    step, _ = reach_target([tuple(h) for h in history], target)
    return None if step is None else int(step)


def _pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f} (n={n})" if n > 1 else " (n=1)")


def _lr_grid(cell: Chosen) -> str:
    return ", ".join(f"**{lr:g}: {acc:.4f}**" if lr == cell.lr else f"{lr:g}: {acc:.4f}"
                     for lr, acc in sorted(cell.grid.items()))


def _setup(cache: Cache, config: StudyConfig) -> list[str]:
    records = list(cache.records.values())
    wall = sum(r["wall_seconds"] for r in records)
    waits = sum(r.get("lock_wait_seconds", 0.0) for r in records)
    loads = [r["load_before"] for r in records]
    host = records[0]["host"] if records else {}
    threads = sorted({r["threads"] for r in records})
    accelerators = sorted({r["accelerator"] for r in records})
    finished = sorted(r["finished"] for r in records)
    malloc = host.get("malloc_env", {})
    return [
        "## Setup", "",
        f"- Data: Fashion-MNIST. Of the {FASHION_MNIST} training images, {config.val_size} (a seeded random split) are "
        f"held out for choosing the learning rate and {FASHION_MNIST - config.val_size} train; the test accuracy is "
        "measured once, after training, on the 10k test split, which no choice looked at.",
        f"- Models: `mlp-bn` (MLP 784-256-128-10 with BatchNorm, 235k parameters) for the full grid; "
        f"`{config.headline_model}` (SmallCNN: three conv-BN-ReLU blocks, 16-32-64 channels) for the headline cells. "
        "The SmallCNN rather than a ResNet: on this shared 2-core CPU one SmallCNN epoch costs ~10 MLP epochs and "
        "the residual blocks would add more; BatchNorm, which is what large batches interact with, is in both.",
        f"- Budget: **{config.epochs} epochs for every batch size** (the papers' equal-epoch protocol): "
        + ", ".join(f"batch {b}: {config.epochs * ((FASHION_MNIST - config.val_size) // b)} steps"
                    for b in sorted(config.batches))
        + f"; the SmallCNN cells {config.headline_epochs} epochs.",
        "- Recipes: `lightning_lbo.recipes` (docs/recipes.md), each with its schedule fitted to the run. LR grid: "
        "the recipe's `base_lr` at the study's start (frozen in `benchmarks/study.py`: `STUDY_RECIPE_KWARGS`; the "
        "scaling rule's prediction: linear, square root for LAMB) times powers of 2, grown outwards while the best "
        "value sits on the edge (4-5 values when complete); chosen by the final "
        "held-out accuracy of seed 0; the chosen LR rerun with seeds 1 and 2 (a seed changes the initialisation, "
        "the shuffling and the held-out split).",
        f"- Machine: {host.get('cpu', '?')} with {host.get('cores', '?')} cores, shared with other agents working "
        f"at the same time (1-minute load average at the start of a run: {min(loads, default=0):.1f} to "
        f"{max(loads, default=0):.1f}; timings are therefore only indicative); torch {host.get('torch', '?')}, "
        f"{', '.join(map(str, threads))} thread(s) per run, accelerator {', '.join(accelerators)}, glibc malloc with "
        + " ".join(f"{k}={v}" for k, v in malloc.items()) + ".",
        f"- Compute: {len(records)} runs, {wall / 3600:.2f} h of wall time in total (plus {waits / 3600:.2f} h waiting "
        "for the shared benchmark lock), finished between "
        f"{finished[0] if finished else '-'} and {finished[-1] if finished else '-'}.", "",
        "Reproduce (resumes from the cache; `--until HH:MM` to stop in time):", "", "```",
        "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 nice -n 5 python benchmarks/study.py",
        "python benchmarks/report.py", "```", ""]


def _baseline(cells: dict, config: StudyConfig) -> tuple[list[str], Chosen | None]:
    base = cells.get(("sgd", config.baseline))
    if base is None:
        return ["## Baseline", "", "Not measured yet.", ""], None
    history = base.seed0["result"]["history"]
    spe = base.seed0["steps_per_epoch"]
    last = [acc for step, _, acc in history if step >= (config.epochs - 2) * spe]
    lines = ["## Baseline: tuned momentum SGD at batch " + str(config.baseline), "",
             f"LR grid (base LR per 256 examples: held-out accuracy, seed 0): {_lr_grid(base)}.", "",
             f"Test accuracy at the chosen LR: {_pm(base.test_mean, base.test_std, len(base.runs))}.",
             f"Plateau: over its last two epochs (seed 0) the held-out accuracy stays within "
             f"{min(last):.4f}-{max(last):.4f} (cosine decay to 0 ends the run; the first half of "
             f"training reached {max(acc for step, _, acc in history if step <= config.epochs * spe / 2):.4f}). "
             "Held-out accuracy at the end of each of the last epochs, mean over the seeds: "
             + ", ".join(f"epoch {e}: {statistics.fmean(_at_epoch(r, e) for r in base.runs):.4f}"
                         for e in range(max(1, config.epochs - 4), config.epochs + 1)) + ".", ""]
    return lines, base


def _at_epoch(record: dict[str, Any], epoch: int) -> float:
    """Held-out accuracy of the last validation at or before the end of ``epoch``."""
    history = record["result"]["history"]
    return [acc for step, _, acc in history if step <= epoch * record["steps_per_epoch"]][-1]


def _by_batch_table(cells: dict, config: StudyConfig, base: Chosen | None) -> list[str]:
    batches = list(sorted(b for b in config.batches if b != config.baseline))
    header = ["recipe", *[f"batch {b}" for b in batches]]
    lines = ["## Test accuracy against batch size (equal epochs)", "",
             "Mean ± standard deviation over seeds at each recipe's chosen LR (n = seeds measured so far); the "
             "difference to the baseline below it. `-`: not measured yet.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe in config.recipes:
        row = [recipe]
        for batch in batches:
            cell = cells.get((recipe, batch))
            if cell is None:
                row.append("-")
                continue
            gap = "" if base is None else f"<br>{cell.test_mean - base.test_mean:+.4f}"
            row.append(_pm(cell.test_mean, cell.test_std, len(cell.runs)) + gap + f"<br>LR {cell.lr:g}")
        lines.append("| " + " | ".join(row) + " |")
    if base is not None:
        lines += ["", f"Baseline (sgd at {config.baseline}): {_pm(base.test_mean, base.test_std, len(base.runs))}."]
    return lines + ["", "![test error against batch size](results/error_vs_batch.png)", ""]


def _grids(cells: dict, config: StudyConfig) -> list[str]:
    lines = ["## LR grids (held-out accuracy of seed 0; chosen LR in bold)", "",
             "| recipe | batch | base LR per 256: held-out accuracy | complete |", "|---|---|---|---|"]
    cache_like = sorted(cells.values(), key=lambda c: (c.model, c.batch, c.name))
    for cell in cache_like:
        if cell.model == config.model and "+" not in cell.name:
            complete = "yes" if len(cell.grid) >= 4 else f"no ({len(cell.grid)} of 4-5)"
            if len(cell.grid) >= 5 and cell.lr in (min(cell.grid), max(cell.grid)):
                complete += " (the best on its edge)"
            lines.append(f"| {cell.name} | {cell.batch} | {_lr_grid(cell)} | {complete} |")
    return lines + [""]


def _steps_table(cells: dict, config: StudyConfig, target: float | None) -> list[str]:
    if target is None:
        return []
    batches = sorted(b for b in config.batches if b != config.baseline)
    lines = [f"## Steps to the target (held-out accuracy >= {target:.4f}: the baseline's final held-out accuracy "
             "minus 0.5%)", "", "First validation step at or above the target (seed 0 at the chosen LR; validation "
             "about 4 times per epoch, every step at batch 8192); `never` with the final held-out accuracy.", "",
             "| recipe | " + " | ".join(f"batch {b} (of {config.epochs * ((FASHION_MNIST - config.val_size) // b)})"
                                        for b in batches) + " |", "|" + "---|" * (len(batches) + 1)]
    base = cells.get(("sgd", config.baseline))
    if base is not None:
        step = first_step(base.seed0["result"]["history"], target)
        lines.insert(4, f"Baseline (sgd at {config.baseline}): {step} of {base.seed0['result']['steps']} steps.\n")
    for recipe in config.recipes:
        row = []
        for batch in batches:
            cell = cells.get((recipe, batch))
            if cell is None:
                row.append("-")
                continue
            res = cell.seed0["result"]
            step = first_step(res["history"], target)
            row.append(str(step) if step is not None else f"never ({res.get('final_acc', math.nan):.4f})")
        lines.append(f"| {recipe} | " + " | ".join(row) + " |")
    return lines + [""]


def _refresh_fraction(cell: Chosen | None) -> float | None:
    if cell is None:
        return None
    counts = cell.seed0["result"].get("kfac_refreshes") or {}
    return 1 - counts["done"] / counts["possible"] if counts.get("possible") else None


def _variant_text(name: str) -> str:
    if "+" not in name:
        return {"kfac": "K-FAC recipe", "spngd": "SP-NGD recipe"}.get(name, name)
    parent, variant = name.split("+", 1)
    return f"{'SP-NGD' if parent == 'spngd' else 'K-FAC'} with {VARIANTS[variant][1]}" if variant in VARIANTS else name


def _ablation(cache: Cache, config: StudyConfig, batch: int) -> list[str]:
    """Every SP-NGD / K-FAC variant run at ``batch`` (seed 0) next to its parent recipe at the same LR."""
    runs: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for record in cache.records.values():
        cell = record["cell"]
        if (cell["model"], cell["epochs"], cell["batch"], cell["seed"]) != (config.model, config.epochs, batch, 0):
            continue
        if cell["recipe"] in ("kfac", "spngd") and cache.get(Cell(**cell)) is not None:
            name = cell["recipe"] + (f"+{cell['variant']}" if cell["variant"] else "")
            runs.setdefault((cell["recipe"], cell["base_lr"]), {})[name] = record
    groups = sorted((k, v) for k, v in runs.items() if any("+" in n for n in v))
    if not groups:
        return []
    lines = [f"### Batch {batch}: each variant next to its parent recipe at the same LR (seed 0)", "",
             "| run | base LR | held-out | test | statistics refreshes skipped |", "|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(["kfac", "spngd", *(f"{VARIANTS[v][0]}+{v}" for v in VARIANTS)])}
    for (recipe, lr), named in groups:
        for name, record in sorted(named.items(), key=lambda kv: order.get(kv[0], len(order))):
            res = record["result"]
            counts = res.get("kfac_refreshes") or {}
            skipped = f"{1 - counts['done'] / counts['possible']:.0%}" if counts.get("possible") else "-"
            lines.append(f"| `{name}`: {_variant_text(name)} | {lr:g} | {score(record):.4f} | "
                         f"{res.get('test_acc', math.nan):.4f} | {skipped} |")
        parent = named.get(recipe)
        if parent is not None and len(named) > 2:
            gains = sorted(((score(r) - score(parent), n) for n, r in named.items() if n != recipe), reverse=True)
            lines += [f"| held-out change against `{recipe}` at LR {lr:g}: "
                      + ", ".join(f"`{n.split('+')[1]}` {g:+.4f}" for g, n in gains) + " | | | | |"]
    return lines + [""]


def _step_race(kfac: Chosen, firsts: Sequence[Chosen], target: float) -> tuple[str, str]:
    """K-FAC's steps to ``target`` against the first-order recipe that gets there in the fewest steps."""
    mine = first_step(kfac.seed0["result"]["history"], target)
    reached = [(first_step(c.seed0["result"]["history"], target), c.name) for c in firsts]
    reached = sorted((step, name) for step, name in reached if step is not None)
    if mine is None:
        return f"K-FAC never reached {target:.4f}", ("**not met**" if reached
                                                     else "undecided (no recipe at this batch reached it)")
    if not reached:
        total = min(c.seed0["result"]["steps"] for c in firsts)
        return (f"K-FAC {mine} steps; no first-order recipe in {total} (ratio < {mine / total:.2f})",
                "**met**" if mine / total <= 0.5 else "not decided")
    theirs, name = reached[0]
    return f"K-FAC {mine} vs {name} {theirs} steps = {mine / theirs:.2f}", (
        "**met**" if mine / theirs <= 0.5 else "**not met**")


def _goals(cells: dict, head: dict, config: StudyConfig, base: Chosen | None, target: float | None) -> list[str]:
    lines = ["## Goals of issue 15", "", "| goal | measured | verdict |", "|---|---|---|"]

    def best_at(batch: int, recipes: Sequence[str], table: dict) -> Chosen | None:
        """The recipe with the best held-out accuracy (mean over its seeds); its test accuracy is reported."""
        found = [table[(r, batch)] for r in recipes if (r, batch) in table]
        return max(found, key=lambda c: c.heldout_mean, default=None)

    # 1. within 0.3% at 2048, mean of 3 seeds, both models
    best = best_at(GOAL_BATCH, config.recipes, cells)
    if base is None or best is None:
        lines.append(f"| 1. best recipe at {GOAL_BATCH} within 0.3% of the baseline (3 seeds, both models) | "
                     "not measured yet | - |")
    else:
        gap = base.test_mean - best.test_mean
        seeds = min(len(best.runs), len(base.runs))
        verdict = ("**met**" if gap <= 0.003 else "**not met**") + ("" if seeds >= 3 else f" so far ({seeds} seed(s))")
        lines.append(f"| 1. MLP-BN: best recipe at {GOAL_BATCH} within 0.3% of the baseline (3 seeds) | "
                     f"{best.name} {_pm(best.test_mean, best.test_std, len(best.runs))} vs sgd@{config.baseline} "
                     f"{_pm(base.test_mean, base.test_std, len(base.runs))}: gap "
                     f"{gap:+.4f} | {verdict} |")
        hb, hbest = head.get(("sgd", config.baseline)), best_at(GOAL_BATCH, config.headline_recipes, head)
        if hb and hbest:
            hgap = hb.test_mean - hbest.test_mean
            seeds = min(len(hb.runs), len(hbest.runs))
            tried = min(len(hb.grid), len(hbest.grid))
            lines.append(f"| 1. SmallCNN ({config.headline_epochs} epochs, {tried} LR value(s) tried) | {hbest.name} "
                         f"{_pm(hbest.test_mean, hbest.test_std, len(hbest.runs))} vs sgd@{config.baseline} "
                         f"{_pm(hb.test_mean, hb.test_std, len(hb.runs))}: gap {hgap:+.4f} | "
                         + ("**met**" if hgap <= 0.003 else "**not met**") + ("" if seeds >= 3 else f" so far "
                                                                              f"({seeds} seed(s))") + " |")
        else:
            lines.append("| 1. SmallCNN | not measured yet | - |")
    # 2. K-FAC at 2048 in <= half the steps of the first-order recipe that gets there first
    kf = cells.get(("kfac", GOAL_BATCH))
    firsts = [cells[(r, GOAL_BATCH)] for r in FIRST_ORDER if r in config.recipes and (r, GOAL_BATCH) in cells]
    if kf is None or not firsts or target is None:
        lines.append(f"| 2. K-FAC at {GOAL_BATCH} reaches the baseline - 0.5% in <= 1/2 the steps of the best "
                     "first-order recipe | not measured yet | - |")
    else:
        text, verdict = _step_race(kf, firsts, target)
        lower = [t for t in (0.89, 0.88, 0.87, 0.85) if t < target] if text.startswith("K-FAC never") else []
        for t in lower:  # the same race at lower targets, for the shape of the curves (not the goal)
            other, _ = _step_race(kf, firsts, t)
            if "never" not in other.split(";")[0]:
                text += f"; at {t:.2f} instead: {other}"
                break
        lines.append(f"| 2. K-FAC at {GOAL_BATCH} to {target:.4f} in <= 1/2 the steps of the best first-order "
                     f"recipe | {text} | {verdict} |")
    # 3. gap at 8192
    best8 = best_at(BEYOND_BATCH, config.recipes, cells)
    if base is None or best8 is None:
        lines.append(f"| 3. gap of the best recipe at {BEYOND_BATCH} (goal <= 1%) | not measured yet | - |")
    else:
        gap = base.test_mean - best8.test_mean
        measured = sum((r, BEYOND_BATCH) in cells for r in config.recipes)
        partial = "" if measured == len(config.recipes) and len(best8.runs) >= 3 else (
            f" so far ({measured} of {len(config.recipes)} recipes, {len(best8.runs)} seed(s))")
        lines.append(f"| 3. gap of the best recipe at {BEYOND_BATCH} (goal <= 1%) | {best8.name} "
                     f"{_pm(best8.test_mean, best8.test_std, len(best8.runs))}: gap {gap:+.4f} | "
                     f"{'**met**' if gap <= 0.01 else '**not met**'}{partial} |")
    # 4. SP-NGD within 0.3% of K-FAC while skipping >= 60% of the refreshes
    for batch in (BEYOND_BATCH, GOAL_BATCH):
        # the recipes as they are, then the variant that skips >= 60% with the best held-out accuracy
        stale = [c for (n, b), c in cells.items() if b == batch and n.split("+")[0] in ("spngd", "kfac") and "+" in n
                 and (_refresh_fraction(c) or 0) >= 0.6]
        best_stale = max(stale, key=lambda c: c.heldout_mean, default=None)
        names = ["spngd", "kfac+stale", *([best_stale.name] if best_stale else [])]
        for name in dict.fromkeys(names):
            sp, kf = cells.get((name, batch)), cells.get(("kfac", batch))
            if sp is None or kf is None:
                continue
            skipped = _refresh_fraction(sp)
            gap = kf.test_mean - sp.test_mean
            ok = gap <= 0.003 and skipped is not None and skipped >= 0.6
            lines.append(f"| 4. {name} (LR {sp.lr:g}) within 0.3% of K-FAC at {batch}, >= 60% refreshes skipped | "
                         f"{_pm(sp.test_mean, sp.test_std, len(sp.runs))} vs "
                         f"{_pm(kf.test_mean, kf.test_std, len(kf.runs))} "
                         f"(gap {gap:+.4f}); skipped "
                         f"{'-' if skipped is None else f'{skipped:.0%}'} | {'**met**' if ok else '**not met**'} |")
    return lines + [""]


def plot_error_vs_batch(cells: dict, config: StudyConfig, base: Chosen | None, path: Path) -> Path | None:
    """Test error against batch per recipe (mean ± std over seeds), the baseline's band, the papers' ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from lightning_lbo.recipes import build_recipe

    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, recipe in enumerate(config.recipes):
        points = sorted((b, cells[(recipe, b)]) for (r, b) in cells if r == recipe and b != config.baseline)
        if not points:
            continue
        xs = [b * 1.04 ** (i - len(config.recipes) / 2) for b, _ in points]  # side by side, not on top
        ys = [1 - c.test_mean for _, c in points]
        errs = [0 if math.isnan(c.test_std) else c.test_std for _, c in points]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=f"C{i}", label=recipe)
    if base is not None:
        err, std = 1 - base.test_mean, 0 if math.isnan(base.test_std) else base.test_std
        ax.axhspan(err - max(std, 5e-4), err + max(std, 5e-4), color="grey", alpha=0.3,
                   label=f"sgd at {config.baseline} (mean ± std, n={len(base.runs)})")
    marks = {"goyal": "Goyal 8K", "lars": "LARS, Akiba 32K", "spngd": "SP-NGD 131K"}
    for recipe, text in marks.items():
        fraction = build_recipe(recipe, 256, 1, 1).paper_batch_fraction
        ax.axvline(fraction * FASHION_MNIST, color="k", linestyle=":", linewidth=1)
        ax.annotate(f"{text} (~{fraction * FASHION_MNIST:.0f})", (fraction * FASHION_MNIST, 0.98),
                    xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=7, rotation=90)
    ax.set(xscale="log", xlabel="global batch size", ylabel="test error",
           title=f"MLP-BN on Fashion-MNIST, {config.epochs} epochs at every batch")
    batches = sorted(config.batches)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(cells: dict, config: StudyConfig, target: float | None, out_dir: Path) -> list[Path]:
    """Held-out accuracy against steps and time of each recipe's chosen cell (seed 0): ``lbo compare``'s outputs."""
    from lightning_lbo.compare import RunResult, write_outputs

    fields = set(RunResult.__dataclass_fields__)
    results = [RunResult(**{k: v for k, v in cell.seed0["result"].items() if k in fields})
               for (name, _), cell in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0]))
               if "+" not in name and not cell.seed0["result"].get("error")]
    if not results:
        return []
    return write_outputs(results, out_dir, target or 0.85,
                         title=f"MLP-BN on Fashion-MNIST ({FASHION_MNIST - config.val_size} training images), "
                               f"{config.epochs} epochs: held-out accuracy of each chosen cell")


def missing(cache: Cache, config: StudyConfig) -> list[str]:
    return list(dict.fromkeys(c.key for c in plan(config, cache) if cache.get(c) is None))


def write_report(config: StudyConfig) -> str:
    cache = Cache(config)
    cells = collect(cache, config.model, config.epochs)
    head = collect(cache, config.headline_model, config.headline_epochs) if config.headline_model else {}
    baseline_lines, base = _baseline(cells, config)
    target = None if base is None else score(base.seed0) - 0.005
    todo = missing(cache, config)
    lines = ["# Large batch at small-batch accuracy? A study on Fashion-MNIST (issue 15)", "",
             f"Generated by `benchmarks/report.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
             f"{len(cache.records)} runs cached in `benchmarks/results/study/` (one JSON per run: configuration, "
             "hyperparameters, held-out history, test accuracy, timings, machine).", ""]
    lines += ["**Status: partial.** " if todo else "**Status: complete.** "]
    if todo:
        lines[-1] += (f"The plan's next {len(todo)} runs are still missing (the LR grids and seeds grow as results "
                      "arrive, so more follow); every figure below says how many seeds and LR values it rests on. "
                      "Next: " + ", ".join(f"`{k}`" for k in todo[:8]) + ("..." if len(todo) > 8 else "") + ".")
    notes = NOTES.read_text().strip().splitlines() if NOTES.exists() and config.results == RESULTS else []
    # Superseded readings (the notes' "### History") go to the end of the report, out of the current reading.
    cut = next((i for i, line in enumerate(notes) if line.startswith(HISTORY)), len(notes))
    history = ["## History" + notes[cut][len(HISTORY):], *notes[cut + 1:]] if cut < len(notes) else []
    notes = notes[:cut]
    lines += ["", *_setup(cache, config), *_goals(cells, head, config, base, target), *notes, "", *baseline_lines,
              *_by_batch_table(cells, config, base), *_steps_table(cells, config, target),
              "## SP-NGD against K-FAC", ""]
    for batch in (BEYOND_BATCH, GOAL_BATCH):
        lines += _ablation(cache, config, batch)
    if head:
        sizes = sorted({len(c.grid) for c in head.values()})
        grid = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        lines += [f"## SmallCNN headline cells ({config.headline_epochs} epochs; LR grids of {grid} values, the chosen "
                  "LR's test accuracy over its seeds)", "",
                  "| recipe | batch | base LR: held-out accuracy (seed 0) | test |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.batch} | {_lr_grid(c)} | {_pm(c.test_mean, c.test_std, len(c.runs))} |"
                  for c in sorted(head.values(), key=lambda c: (c.batch, c.name))]
        lines.append("")
    lines += _grids(cells, config)
    lines += ["## Curves", "", "![held-out accuracy against steps](results/curves/accuracy.png)", ""]
    lines += [*history, ""] if history else []
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the study's cache directory")
    parser.add_argument("--out", type=Path, default=REPORT, help="the report to write")
    args = parser.parse_args(argv)
    config = StudyConfig(results=args.results)
    text = write_report(config)
    args.out.write_text(text)
    cache = Cache(config)
    cells = collect(cache, config.model, config.epochs)
    base = cells.get(("sgd", config.baseline))
    target = None if base is None else score(base.seed0) - 0.005
    plots = args.out.parent / "results"
    plots.mkdir(parents=True, exist_ok=True)
    written = [plot_error_vs_batch(cells, config, base, plots / "error_vs_batch.png"),
               *plot_curves(cells, config, target, plots / "curves")]
    for path in written:
        if path:
            print(f"wrote {path}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
