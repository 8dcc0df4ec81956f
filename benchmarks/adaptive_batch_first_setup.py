"""The adaptive-batch configuration a user reaches first, against fixed batch 128 (issue 26, item 13).

A newcomer writes ``AdaptiveBatchSize(rule="noise_scale")``, is told by its setup error to add
``GradientNoiseScale(beta=0.9, probe_every_n_steps=20)``, and trains with momentum SGD at a constant
LR. Cells, each one run cached as ``benchmarks/adaptive_batch_results/first-setup/<cell>-s<seed>.json``
(a finished cell is never rerun; each run holds one slot of the shared benchmark lock, one thread):

* ``fixed-128``: momentum SGD (Nesterov 0.9, wd 5e-4) at a constant LR 0.1, batch 128.
* ``linear-at-once``: the configuration above as it ran before this change: no ``LRSchedule``, so
  each growth multiplies every LR by the growth at once (linear rule, no re-warmup); the default
  ``accumulate`` mechanism and ``max_factor=16``. After the change this needs ``lr_at_growth="linear"``.
* ``recommended``: the pairing the setup now asks for: ``LRSchedule(reference_batch_size=128,
  scaling="sqrt")`` (constant schedule) and ``AdaptiveBatchSize(rewarmup_steps=50)``.
* ``keep-lr``: ``scale_lr=False`` (the batch grows, the LR stays at 0.1).

MLP with batch norm, the first 12,000 Fashion-MNIST training images, 5 epochs, test accuracy on the
official 10,000 test images.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/adaptive_batch_first_setup.py \\
        --seeds 0 1 2 --cells fixed-128 linear-at-once recommended
    python benchmarks/adaptive_batch_first_setup.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "adaptive_batch_results" / "first-setup"
TRAIN_IMAGES, EPOCHS, BATCH, LR = 12000, 5, 128, 0.1
CELLS = ("fixed-128", "linear-at-once", "recommended", "keep-lr")


def run_cell(cell: str, seed: int) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_lbo.callbacks import AdaptiveBatchSize, GradientNoiseScale, LRSchedule
    from lightning_lbo.classifier import ClassifierModule, sgd_factory
    from lightning_lbo.data import FashionMNISTDataModule

    callbacks: list[Any] = []
    if cell != "fixed-128":
        callbacks.append(GradientNoiseScale(beta=0.9, probe_every_n_steps=20))
        if cell == "recommended":
            callbacks.insert(0, LRSchedule(reference_batch_size=BATCH, scaling="sqrt", log=False))
            callbacks.append(AdaptiveBatchSize(rule="noise_scale", rewarmup_steps=50))
        elif cell == "keep-lr":
            callbacks.append(AdaptiveBatchSize(rule="noise_scale", scale_lr=False))
        else:  # the LR multiplied by each growth at once: the old default, explicit where the option exists
            import inspect

            explicit = "lr_at_growth" in inspect.signature(AdaptiveBatchSize).parameters
            callbacks.append(AdaptiveBatchSize(rule="noise_scale", **({"lr_at_growth": "linear"} if explicit else {})))
    pl.seed_everything(seed, verbose=False)
    module = ClassifierModule("mlp", optimizer=sgd_factory(lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True),
                              model_kwargs={"batch_norm": True})
    dm = FashionMNISTDataModule(batch_size=BATCH, eval_batch_size=2500, seed=seed, train_subset=TRAIN_IMAGES)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
    abs_cb = next((cb for cb in callbacks if isinstance(cb, AdaptiveBatchSize)), None)
    return {"cell": cell, "seed": seed, "steps": trainer.global_step, "test_acc": test_acc, "wall_s": wall,
            "history": abs_cb.history if abs_cb else [], "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            "torch": torch.__version__}


def run(seeds: list[int], cells: list[str]) -> None:
    from benchmarks.bench_lock import bench_lock

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for seed in seeds:
        for cell in cells:
            path = RESULTS / f"{cell}-s{seed}.json"
            if path.exists():
                continue
            with bench_lock():
                result = run_cell(cell, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
            print(f"{cell} seed {seed}: {result['steps']} steps, test acc {result['test_acc']:.4f}, "
                  f"{result['wall_s']:.0f} s, factors {[h['next_factor'] for h in result['history']]}", flush=True)


def report(seeds: list[int]) -> str:
    """A markdown table: per cell, steps and test accuracy (mean and per seed) against fixed-128."""
    runs = {c: [json.loads(p.read_text()) for s in seeds if (p := RESULTS / f"{c}-s{s}.json").exists()]
            for c in CELLS}
    base = {r["seed"]: r for r in runs["fixed-128"]}
    lines = ["| configuration | seeds | steps (x fixed-128) | test accuracy, mean | vs fixed-128 (points, per seed) "
             "| batch factors at the epoch ends |", "|---|---|---|---|---|---|"]
    for cell, rows in runs.items():
        if not rows:
            continue
        steps = statistics.mean(r["steps"] for r in rows)
        ratio = statistics.mean(r["steps"] / base[r["seed"]]["steps"] for r in rows if r["seed"] in base)
        acc = statistics.mean(r["test_acc"] for r in rows)
        deltas = [100 * (r["test_acc"] - base[r["seed"]]["test_acc"]) for r in rows if r["seed"] in base]
        factors = "; ".join(",".join(str(h["next_factor"]) for h in r["history"]) or "-" for r in rows)
        lines.append(f"| `{cell}` | {len(rows)} | {steps:.0f} ({ratio:.2f}x) | {100 * acc:.2f}% | "
                     f"{statistics.mean(deltas):+.2f} pp ({', '.join(f'{d:+.2f}' for d in deltas)}) | {factors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=list(CELLS[:3]), choices=CELLS)
    parser.add_argument("--report", action="store_true", help="print the table from the cache only")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.report:
        print(report(args.seeds))
    else:
        run(args.seeds, args.cells)


if __name__ == "__main__":
    main()
