"""Batch size that grows by itself, measured on Fashion-MNIST (issue 16, goals 1-4).

Cells, each one training run cached as ``benchmarks/adaptive_batch_results/<model>/<cell>-s<seed>.json``
(a finished cell is never rerun, so the study resumes where it stopped; the runs of one model and
seed, a few minutes in all, hold the shared benchmark lock together, :mod:`benchmarks.bench_lock`):

* ``fixed-B``: momentum SGD (Nesterov 0.9, wd 5e-4) at a fixed batch ``B``, LR ``0.1 x B / 128``
  (LRSchedule, linear rule, Goyal warmup over the first epoch for ``B > 128``), cosine decay to 0.
* ``noise``: starts at 128; ``NoiseScaleRule(margin=1)`` doubles the batch (resize mechanism) at an
  epoch end when ``B_simple`` (GradientNoiseScale, two-halves probe every 20 steps) exceeds it; the
  LR follows through LRSchedule (linear rule, 20-step re-warmup), the cosine clock counts examples.
* ``abs``: ABS, ``HessianRule(ratio 0.5, duration 2)`` with gradient accumulation (as the paper).
* ``absa``: ``abs`` plus FGSM examples (ratio 0.2, eps 0.005, until half of training).
* ``replay-noise`` / ``replay-abs``: ``RampRule`` replaying that seed's batch schedule without any
  measurement; wall-time ratio ``noise / replay-noise`` is the noise rule's overhead (goal 4).
* ``advise``: the critical-batch advisor (:func:`lightning_lbo.critical_batch.advise`, 300 steps at 128).

All runs: 55k training images (5k held out for validation every quarter epoch), test accuracy on the
official 10k, equal epochs. ``--report`` rewrites ``benchmarks/ADAPTIVE_BATCH.md`` and the plots from
whatever is cached, naming the missing cells.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 nice -n 5 python benchmarks/adaptive_batch.py \\
        --model mlp-bn --seeds 0 1 2
    python benchmarks/adaptive_batch.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "adaptive_batch_results"
BASE_BATCH, BASE_LR, MAX_FACTOR, REWARMUP = 128, 0.1, 16, 20
FIXED = (128, 256, 512, 1024, 2048, 4096)
EPOCHS = {"mlp-bn": 5, "cnn": 3}
MODEL_SPECS = {"mlp-bn": ("mlp", {"batch_norm": True}), "cnn": ("cnn", {})}
TRAIN_SUBSET: int | None = None  # smoke tests only (--train-subset); the study uses all images
TARGETS = {"mlp-bn": 0.86, "cnn": 0.85}  # validation accuracy of the steps-to-target columns


def cell_order() -> list[str]:
    """Most informative first: the goals' runs, the advisor, the sweep's ends, then the rest."""
    return ["fixed-128", "noise", "advise", "fixed-2048", "fixed-512", "abs", "replay-noise", "absa", "fixed-1024",
            "fixed-256", "fixed-4096", "replay-abs"]


def cell_path(model: str, cell: str, seed: int) -> Path:
    return RESULTS / model / f"{cell}-s{seed}.json"


def load(model: str, cell: str, seed: int) -> dict[str, Any] | None:
    path = cell_path(model, cell, seed)
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------- running
def datamodule(seed: int, resizable: bool):
    from lightning_lbo.batch_sampler import ResizableBatchSampler, ResizableDataLoader
    from lightning_lbo.data import FashionMNISTDataModule, collate_batch

    class BenchData(FashionMNISTDataModule):
        loader = None

        def train_dataloader(self):
            if not resizable:
                return super().train_dataloader()
            if self.loader is None:  # one loader: the resize mechanism keeps resizing the same sampler
                sampler = ResizableBatchSampler(len(self.train_set), self.batch_size, seed=self.seed)
                self.loader = ResizableDataLoader(self.train_set, sampler, collate_fn=collate_batch)
            return self.loader

    return BenchData(batch_size=BASE_BATCH, val_size=5000, eval_batch_size=2500, seed=seed,
                     train_subset=TRAIN_SUBSET)


def recorder():
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        """Global batch and LR every 10 steps, validation accuracy at every validation."""

        def __init__(self):
            self.trace, self.curve = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step % 10 == 0:
                lr = optimizer.param_groups[0]["lr"]
                batch = getattr(trainer.train_dataloader, "batch_size", None) or \
                    trainer.train_dataloader.batch_sampler.batch_size
                self.trace.append((trainer.global_step, trainer.current_epoch, batch * trainer.accumulate_grad_batches,
                                   float(lr)))

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                self.curve.append((trainer.global_step, trainer.current_epoch,
                                   float(trainer.callback_metrics["val_acc"])))

    return Recorder()


def run_cell(model: str, cell: str, seed: int, epochs: int) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_lbo.batch_rules import HessianRule, NoiseScaleRule, RampRule
    from lightning_lbo.callbacks import AdaptiveBatchSize, AdversarialTraining, GradientNoiseScale, LRSchedule
    from lightning_lbo.classifier import ClassifierModule, sgd_factory

    if cell == "advise":
        from lightning_lbo.critical_batch import advise

        start = time.perf_counter()
        advice = advise(model, BASE_BATCH, BASE_LR, steps=300, seed=seed)
        return {"b_simple": advice.b_simple, "recommended_batch": advice.recommended_batch,
                "recommended_lr": advice.recommended_lr, "steps": advice.steps, "history": advice.history,
                "wall_s": time.perf_counter() - start}
    batch, resizable, callbacks = BASE_BATCH, False, []
    if cell.startswith("fixed-"):
        batch = int(cell.split("-")[1])
    elif cell in ("noise", "replay-noise"):
        resizable = True
    rule = mechanism = None
    if cell == "noise":
        rule, mechanism = NoiseScaleRule(margin=1.0), "resize"
        callbacks.append(GradientNoiseScale(beta=0.9, probe_every_n_steps=20, log_every_n_steps=20))
    elif cell in ("abs", "absa"):
        rule, mechanism = HessianRule(eigenvalue_ratio=0.5, duration=2), "accumulate"
    elif cell.startswith("replay-"):
        source = load(model, cell.split("-", 1)[1], seed)
        if source is None:
            raise RuntimeError(f"{cell} replays the schedule of {cell.split('-', 1)[1]}, which is not cached yet.")
        factors = {0: 1}
        for row in source["history"]:
            factors[row["epoch"] + 1] = row["next_factor"]
        rule, mechanism = RampRule(factors), ("resize" if cell == "replay-noise" else "accumulate")
    k = batch / BASE_BATCH
    schedule = LRSchedule(reference_batch_size=BASE_BATCH, scaling="linear", decay="cosine", log=False,
                          **({"warmup_epochs": 1} if k > 1 else {}))
    callbacks.insert(0, schedule)
    if rule is not None:
        callbacks.append(AdaptiveBatchSize(rule=rule, mechanism=mechanism, max_factor=MAX_FACTOR,
                                           rewarmup_steps=REWARMUP))
    if cell == "absa":
        callbacks.append(AdversarialTraining(ratio=0.2, epsilon=0.005, stop_fraction=0.5))
    rec = recorder()
    callbacks.append(rec)
    pl.seed_everything(seed, verbose=False)
    name, kwargs = MODEL_SPECS[model]
    module = ClassifierModule(name, optimizer=sgd_factory(lr=BASE_LR, momentum=0.9, weight_decay=5e-4, nesterov=True),
                              model_kwargs=kwargs)
    dm = datamodule(seed, resizable)
    dm.batch_size = batch
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=0.25, callbacks=callbacks,
                         reload_dataloaders_every_n_epochs=1 if resizable else 0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
    abs_cb = next((cb for cb in callbacks if isinstance(cb, AdaptiveBatchSize)), None)
    gns = next((cb for cb in callbacks if isinstance(cb, GradientNoiseScale)), None)
    return {"steps": trainer.global_step, "test_acc": test_acc, "wall_s": wall, "curve": rec.curve,
            "trace": rec.trace, "history": abs_cb.history if abs_cb else [],
            "b_simple": gns.history if gns else []}


def run(models: list[str], seeds: list[int], cells: list[str] | None, threads: int) -> None:
    from benchmarks.bench_lock import bench_lock

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for seed in seeds:
        for model in models:
            todo = [c for c in (cells or cell_order()) if not cell_path(model, c, seed).exists()]
            if not todo:
                continue
            # One lock per (model, seed): its MLP runs take 15-60 s each, the whole group a few minutes.
            with bench_lock(exclusive=threads > 1):  # a multi-thread run (and its overhead timing) takes the cores
                for cell in todo:
                    load_before = os.getloadavg()[0]
                    result = run_cell(model, cell, seed, EPOCHS[model])
                    load_after = os.getloadavg()[0]
                    save(model, cell, seed, threads, result, load_before, load_after)


def save(model: str, cell: str, seed: int, threads: int, result: dict[str, Any], load_before: float,
         load_after: float) -> None:
    path = cell_path(model, cell, seed)
    result.update(model=model, cell=cell, seed=seed, epochs=EPOCHS[model], threads=threads,
                  load_before=load_before, load_after=load_after, torch=torch.__version__,
                  allocator=f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}",
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    print(f"{model} {cell} seed {seed}: {result.get('steps')} steps, test acc "
          f"{result.get('test_acc', float('nan')):.4f}, {result['wall_s']:.0f} s", flush=True)

# ---------------------------------------------------------------------------------------------- report
def steps_to(curve: list, target: float) -> int | None:
    return next((step for step, _, acc in curve if acc >= target), None)


def critical_batch(model: str, seeds: list[int]) -> tuple[dict[int, float], float | None]:
    """Mean steps-to-target per fixed batch and ``B_crit`` of the fit ``S = S_min (1 + B_crit / B)``."""
    target, steps = TARGETS[model], {}
    for b in FIXED:
        runs = [load(model, f"fixed-{b}", s) for s in seeds]
        reached = [steps_to(r["curve"], target) for r in runs if r]
        if reached and all(x is not None for x in reached):
            steps[b] = statistics.mean(reached)
    if len(steps) < 3:
        return steps, None
    xs, ys = [1 / b for b in steps], list(steps.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    return steps, (slope / intercept if intercept > 0 and slope > 0 else None)


def summarize(model: str, cell: str, seeds: list[int]) -> dict[str, Any] | None:
    runs = [r for r in (load(model, cell, s) for s in seeds) if r]
    if not runs:
        return None

    def stat(key):
        values = [r[key] for r in runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out = {"n": len(runs), "seeds": [r["seed"] for r in runs], "wall": stat("wall_s"),
           "load": statistics.mean(r["load_before"] for r in runs)}
    if cell == "advise":
        out.update(b_simple=stat("b_simple"), recommended=[r["recommended_batch"] for r in runs])
    else:
        out.update(steps=stat("steps"), acc=stat("test_acc"),
                   final_batch=[r["history"][-1]["global_batch"] if r["history"] else None for r in runs])
    return out


def plot_run(model: str, seed: int, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {c: load(model, c, seed) for c in ("fixed-128", "noise", "abs")}
    runs = {c: r for c, r in runs.items() if r}
    if len(runs) < 2:
        return False
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    for cell, r in runs.items():
        x = [t[0] for t in r["trace"]]  # optimizer step, shared with the accuracy panel
        axes[0].plot(x, [t[2] for t in r["trace"]], label=cell)
        axes[1].plot(x, [t[3] for t in r["trace"]], label=cell)
        axes[2].plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], label=f"{cell} ({r['steps']} steps)")
    axes[0].set_yscale("log", base=2)
    axes[0].set_ylabel("global batch")
    axes[1].set_ylabel("LR")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("validation accuracy")
    axes[2].set_ylim(0.75, 0.92)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST {model}, seed {seed}: batch size, LR and accuracy over a run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(models: list[str], seeds: list[int]) -> None:
    lines = ["# Adaptive batch size: measured (issue 16)", "",
             "Generated by `python benchmarks/adaptive_batch.py --report` from the cache in "
             "`benchmarks/adaptive_batch_results/` (one JSON per run; see the script's docstring for the cells).",
             ""]
    for model in models:
        lines += [f"## {model}, {EPOCHS[model]} epochs, seeds {seeds}", ""]
        rows, missing = {}, []
        for cell in cell_order():
            summary = summarize(model, cell, seeds)
            if summary is None or summary["n"] < len(seeds):
                missing.append(f"{cell} ({0 if summary is None else summary['n']}/{len(seeds)} seeds)")
            if summary is not None:
                rows[cell] = summary
        if not rows:
            lines += ["No cell finished yet.", ""]
            continue
        lines += ["| run | seeds | optimizer steps | test accuracy | wall s | load avg | final batch |",
                  "|---|---|---|---|---|---|---|"]
        for cell, s in rows.items():
            if cell == "advise":
                continue
            final = ", ".join(str(b) for b in s["final_batch"] if b) or "-"
            lines.append(f"| {cell} | {s['n']} | {s['steps'][0]:.0f} ± {s['steps'][1]:.0f} | "
                         f"{s['acc'][0]:.4f} ± {s['acc'][1]:.4f} | {s['wall'][0]:.0f} | {s['load']:.1f} | {final} |")
        lines.append("")
        base = rows.get("fixed-128")
        goals = []
        if base:
            for cell, limit in (("noise", 0.4), ("abs", 0.5)):
                if cell in rows:
                    r = rows[cell]
                    ratio = r["steps"][0] / base["steps"][0]
                    drop = base["acc"][0] - r["acc"][0]
                    goals.append(f"- {cell}: {ratio:.2f}x the steps of fixed-128, accuracy {-drop * 100:+.2f} points "
                                 f"(goal: <= {limit}x, >= {-0.3 if cell == 'noise' else -0.5} points)")
            if "absa" in rows and "abs" in rows:
                goals.append(f"- absa vs abs: accuracy {(rows['absa']['acc'][0] - rows['abs']['acc'][0]) * 100:+.2f} "
                             "points")
        for cell in ("noise", "abs"):
            if cell in rows and f"replay-{cell}" in rows:
                pairs = [(load(model, cell, s), load(model, f"replay-{cell}", s)) for s in seeds]
                ratios = [a["wall_s"] / b["wall_s"] for a, b in pairs if a and b]
                goals.append(f"- overhead of the {cell} rule (wall {cell} / replay of its schedule, same seed, "
                             f"back to back): {', '.join(f'{x:.3f}' for x in ratios)}")
        steps, b_crit = critical_batch(model, seeds)
        if steps:
            goals.append(f"- steps to {TARGETS[model]:.0%} validation accuracy (mean over seeds): "
                         + ", ".join(f"{b}: {s:.0f}" for b, s in steps.items())
                         + (f"; fit S = S_min (1 + B_crit / B): B_crit = {b_crit:.0f}" if b_crit else ""))
        if "advise" in rows:
            adv = rows["advise"]
            goals.append(f"- advisor (300 steps at 128): B_simple {adv['b_simple'][0]:.0f} ± {adv['b_simple'][1]:.0f}, "
                         f"recommended batch {adv['recommended']}"
                         + (f"; ratio to B_crit {statistics.mean(adv['recommended']) / b_crit:.2f}" if b_crit else ""))
        lines += ["Goals:", ""] + (goals or ["- nothing to compare yet"]) + [""]
        if missing:
            lines += ["Missing cells: " + ", ".join(missing), ""]
        img = ROOT.parent / "docs" / "img" / f"adaptive_batch_{model}.png"
        if plot_run(model, seeds[0], img):
            lines += [f"![run](../docs/img/{img.name})", ""]
    any_run = next((json.loads(p.read_text()) for p in sorted(RESULTS.rglob("*.json"))), None)
    if any_run:
        lines += [f"Machine: {any_run['machine']}, shared with other agents (load average per run in the table), "
                  f"{any_run['threads']} torch threads, {any_run['allocator']}, torch {any_run['torch']}.", ""]
    (ROOT / "ADAPTIVE_BATCH.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp-bn"], choices=tuple(MODEL_SPECS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=None, help=f"subset of {cell_order()}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="write the report from the cache only")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs (smoke tests)")
    parser.add_argument("--train-subset", type=int, default=None, help="first N images (smoke tests)")
    parser.add_argument("--results", default=None, help="cache directory (default: adaptive_batch_results)")
    args = parser.parse_args()
    global RESULTS, TRAIN_SUBSET
    if args.results:
        RESULTS = Path(args.results)
    TRAIN_SUBSET = args.train_subset
    if args.epochs:
        EPOCHS.update(dict.fromkeys(EPOCHS, args.epochs))
    if args.report:
        report(args.model, args.seeds)
    else:
        run(args.model, args.seeds, args.cells, args.threads)


if __name__ == "__main__":
    main()
