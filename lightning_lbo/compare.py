"""``lbo compare``: train recipes side by side on real data and print what was measured.

Each (recipe, batch size) run trains a fresh reference model in a fresh child process, so that its
peak memory (max RSS) is its own and no state leaks between runs. Validation accuracy is recorded
against optimizer steps and training wall time (validation excluded); the table shows final
accuracy, steps and seconds to the target accuracy (``-`` when never reached), time per step and
peak memory. Results go to ``<out_dir>/results.csv``, ``history.csv`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunSpec:
    """One training run of a comparison."""

    recipe: str
    batch_size: int
    epochs: int
    model: str = "cnn"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    data_dir: str | None = None
    train_subset: int | None = None
    eval_every: int = 0
    seed: int = 0
    threads: int = 0


@dataclass
class RunResult:
    recipe: str
    batch_size: int
    steps: int
    final_acc: float
    best_acc: float
    steps_to_target: int | None
    seconds_to_target: float | None
    seconds_per_step: float
    peak_rss_mb: float
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train seconds, val acc)
    error: str = ""


def _history_callback(bases: tuple[type, ...]) -> Any:
    class History(*bases):
        """Times training batches (validation excluded) and records validation accuracy per step."""

        def __init__(self) -> None:
            self.train_seconds = 0.0
            self.steps_timed = 0
            self.records: list[tuple[int, float, float]] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.train_seconds += time.perf_counter() - self._start
            self.steps_timed += 1

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
                return
            acc = float(trainer.callback_metrics["val_acc"])
            self.records.append((trainer.global_step, self.train_seconds, acc))

    return History()


def run_one(spec: RunSpec) -> RunResult:
    """Train one recipe at one batch size; returns the measurements (called in a child process)."""
    import torch

    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.compat import callback_bases
    from lightning_lbo.data import FashionMNISTDataModule
    from lightning_lbo.recipes import build_recipe

    import pytorch_lightning as pl

    if spec.threads:
        torch.set_num_threads(spec.threads)
    pl.seed_everything(spec.seed, verbose=False)
    world = spec.devices * spec.num_nodes
    if spec.batch_size % world:
        raise ValueError(f"--batch-size {spec.batch_size} is not divisible by devices x nodes = {world}.")
    dm = FashionMNISTDataModule(batch_size=spec.batch_size // world, data_dir=spec.data_dir,
                                train_subset=spec.train_subset, eval_batch_size=2048, drop_last=True, seed=spec.seed)
    dm.setup("fit")
    if spec.batch_size > len(dm.train_set):
        raise ValueError(f"--batch-size {spec.batch_size} is larger than the {len(dm.train_set)} training images.")
    steps_per_epoch = len(dm.train_set) // spec.batch_size
    recipe = build_recipe(spec.recipe, global_batch_size=spec.batch_size, epochs=spec.epochs,
                          steps_per_epoch=steps_per_epoch)
    history = _history_callback(callback_bases())
    module = ClassifierModule(spec.model, optimizer=recipe.optimizer)
    eval_every = spec.eval_every or steps_per_epoch
    trainer = pl.Trainer(
        accelerator="cpu", devices=spec.devices, num_nodes=spec.num_nodes, strategy=spec.strategy,
        max_epochs=spec.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[history, *recipe.callbacks], val_check_interval=min(eval_every, steps_per_epoch),
        num_sanity_val_steps=0, enable_progress_bar=sys.stderr.isatty(),
    )
    trainer.fit(module, datamodule=dm)
    records = history.records
    return RunResult(
        recipe=spec.recipe, batch_size=spec.batch_size, steps=trainer.global_step,
        final_acc=records[-1][2] if records else math.nan, best_acc=max((r[2] for r in records), default=math.nan),
        steps_to_target=None, seconds_to_target=None,
        seconds_per_step=history.train_seconds / max(1, history.steps_timed),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, history=records,
    )


def _run_in_child(spec: RunSpec) -> RunResult:
    """Run ``run_one`` in a fresh spawned process (own peak memory, no leaked state)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(run_one, (spec,))


def reach_target(history: Sequence[tuple[int, float, float]], target: float) -> tuple[int | None, float | None]:
    """First (step, train seconds) at which validation accuracy >= target, or (None, None)."""
    for step, seconds, acc in history:
        if acc >= target:
            return step, seconds
    return None, None


def format_table(results: Sequence[RunResult], target: float) -> str:
    header = ("recipe", "batch", "steps", "final acc", "best acc", f"steps to {target:.1%}",
              f"s to {target:.1%}", "s/step", "peak RSS MB")
    rows = [header]
    for r in results:
        if r.error:
            rows.append((r.recipe, str(r.batch_size), "-", "failed: " + r.error[:60], "", "", "", "", ""))
            continue
        rows.append((r.recipe, str(r.batch_size), str(r.steps), f"{r.final_acc:.4f}", f"{r.best_acc:.4f}",
                     "-" if r.steps_to_target is None else str(r.steps_to_target),
                     "-" if r.seconds_to_target is None else f"{r.seconds_to_target:.1f}",
                     f"{r.seconds_per_step:.3f}", f"{r.peak_rss_mb:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(results: Sequence[RunResult], out_dir: Path, target: float) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.csv", out_dir / "history.csv"]
    with open(written[0], "w", newline="") as fh:
        fields = [k for k in asdict(results[0]) if k != "history"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "history"})
    with open(written[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["recipe", "batch_size", "step", "train_seconds", "val_acc"])
        for r in results:
            writer.writerows([r.recipe, r.batch_size, *rec] for rec in r.history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no accuracy.png (pip install matplotlib)", file=sys.stderr)
        return written
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.history:
            steps, _, accs = zip(*r.history)
            ax.plot(steps, accs, marker="o", label=f"{r.recipe} @ {r.batch_size}")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set(xlabel="optimizer step", ylabel="validation accuracy", xscale="log", title="lbo compare: Fashion-MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    return [*written, out_dir / "accuracy.png"]


def compare(specs: Sequence[RunSpec], target: float, out_dir: Path, in_process: bool = False) -> list[RunResult]:
    """Run every spec (each in a child process unless ``in_process``), print the table, write outputs."""
    results = []
    for spec in specs:
        print(f"== {spec.recipe} at global batch {spec.batch_size}, {spec.epochs} epoch(s)", flush=True)
        try:
            result = run_one(spec) if in_process else _run_in_child(spec)
        except Exception as err:  # the table still shows what was measured for the other runs
            result = RunResult(spec.recipe, spec.batch_size, 0, math.nan, math.nan, None, None, math.nan, math.nan,
                               error=f"{type(err).__name__}: {err}")
            print(f"   failed: {result.error}", file=sys.stderr)
        result.steps_to_target, result.seconds_to_target = reach_target(result.history, target)
        results.append(result)
    print()
    print(format_table(results, target))
    never = [f"{r.recipe}@{r.batch_size}" for r in results if not r.error and r.steps_to_target is None]
    if never:
        print(f"target accuracy {target:.1%} was not reached by: {', '.join(never)}")
    for path in write_outputs(results, out_dir, target):
        print(f"wrote {path}")
    return results


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    from lightning_lbo.recipes import RECIPES

    p = sub.add_parser("compare", help="train recipes side by side on Fashion-MNIST and print a table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="sgd", help=f"comma-separated, from: {', '.join(sorted(RECIPES))}")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch size of the recipes")
    p.add_argument("--baseline-batch-size", type=int, default=0,
                   help="also train momentum SGD at this small batch (0: no baseline row)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet", "mlp"))
    p.add_argument("--target", type=float, default=0.85, help="target validation accuracy")
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: each epoch)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where CSV and PNG go (default lbo_runs/compare-<time>)")
    p.add_argument("--in-process", action="store_true", help="run every recipe in this process (no child)")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from lightning_lbo.data import DataNotFoundError, locate_fashion_mnist
    from lightning_lbo.recipes import RECIPES

    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        print(f"Unknown recipe(s): {unknown or args.recipes!r}. Available: {', '.join(sorted(RECIPES))}.",
              file=sys.stderr)
        return 2
    if not 0.0 < args.target <= 1.0:
        print(f"Invalid --target {args.target}: use an accuracy in (0, 1].", file=sys.stderr)
        return 2
    if args.epochs < 1 or args.batch_size < 1 or args.baseline_batch_size < 0:
        print("--epochs and --batch-size must be positive, --baseline-batch-size >= 0.", file=sys.stderr)
        return 2
    try:
        locate_fashion_mnist(args.data_dir)
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    common = dict(epochs=args.epochs, model=args.model, devices=args.devices, num_nodes=args.num_nodes,
                  strategy=args.strategy, data_dir=args.data_dir, train_subset=args.train_subset,
                  eval_every=args.eval_every, seed=args.seed, threads=args.threads)
    specs = [RunSpec("sgd", args.baseline_batch_size, **common)] if args.baseline_batch_size else []
    specs += [RunSpec(name, args.batch_size, **common) for name in names]
    out_dir = Path(args.out_dir or os.path.join("lbo_runs", time.strftime("compare-%Y%m%d-%H%M%S")))
    results = compare(specs, args.target, out_dir, in_process=args.in_process)
    return 0 if any(not r.error for r in results) else 1
