"""Why SP-NGD skips few refreshes (issue 15, goal 4): trace every stale-statistics decision of one run.

Trains one study cell in this process (the study's data split, model and frozen recipe arguments) with
the preconditioner's interval update wrapped: on every refresh of every statistic (a layer's ``A``,
``G`` or unit-wise BN ``F``) it records the step, the relative change
``||X_t - X_prev||_F / ||X_prev||_F`` that the policy compared with its threshold, and the interval
chosen. Diagnostic only (it reads the change tensors, one host sync per refresh); the study's runs
never do this. Writes ``benchmarks/results/study/traces/<cell key>.json`` with a per-statistic
summary (refreshes, share of steps skipped, median change, share of refreshes judged stable).

Usage (holds one slot of the shared benchmark lock, one thread)::

    python benchmarks/stale_trace.py spngd 2048 0.01 [--epochs 10] [--kw '{"stale_threshold": 0.2}']
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.study import RESULTS, STUDY_RECIPE_KWARGS, StudyConfig, steps_per_epoch  # noqa: E402


def trace(recipe: str, batch: int, base_lr: float, epochs: int, extra: dict[str, Any], seed: int = 0,
          model: str = "mlp-bn") -> dict[str, Any]:
    """Train and return ``{"events": [(step, block, stat, change, interval)], "summary": ..., "result": ...}``."""
    from dataclasses import asdict

    from lightning_lbo.compare import RunSpec, run_one
    from lightning_lbo.optim.kfac import refresh

    events: list[tuple[int, str, str, float, int]] = []
    original = refresh.update_intervals

    def recording(news, ok, changes, base, policy, comm, step):
        original(news, ok, changes, base, policy, comm, step)
        for (block, stat, _), change in zip(news, changes, strict=True):
            events.append((step, block.name, stat, float("nan") if change is None else float(change),
                           block.interval[stat]))

    config = StudyConfig()
    spe = steps_per_epoch(config, batch)
    kwargs = {**STUDY_RECIPE_KWARGS[recipe], "base_lr": base_lr, **extra}
    spec = RunSpec(recipe, batch, epochs, recipe_kwargs=kwargs, model=model, seed=seed, eval_every=max(1, spe // 4),
                   threads=1, progress=False, val_size=config.val_size, test=True)
    refresh.update_intervals = recording  # the statistics' refresh looks it up in its module at each call
    try:
        result = asdict(run_one(spec))
    finally:
        refresh.update_intervals = original
    steps = result["steps"]
    summary = {}
    for key in dict.fromkeys((e[1], e[2]) for e in events):
        mine = [e for e in events if (e[1], e[2]) == key]
        changes = [e[3] for e in mine if e[3] == e[3]]
        threshold = kwargs.get("stale_threshold")
        summary[f"{key[0]}.{key[1]}"] = {
            "refreshes": len(mine), "skipped": round(1 - len(mine) / max(1, steps), 3),
            "median_change": round(statistics.median(changes), 4) if changes else None,
            "stable": round(sum(c < threshold for c in changes) / len(changes), 3) if changes and threshold else None,
            "last_interval": mine[-1][4]}
    return {"recipe": recipe, "batch": batch, "base_lr": base_lr, "epochs": epochs, "recipe_kwargs": kwargs,
            "steps": steps, "summary": summary, "events": events,
            "result": {k: result[k] for k in ("final_acc", "test_acc", "kfac_refreshes", "steps")}}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_lock import bench_lock

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=("kfac", "spngd"))
    p.add_argument("batch", type=int)
    p.add_argument("base_lr", type=float)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kw", type=json.loads, default={}, help="recipe keyword overrides (JSON)")
    p.add_argument("--name", default="", help="file name suffix (default: from --kw)")
    args = p.parse_args(argv)
    with bench_lock():
        out = trace(args.recipe, args.batch, args.base_lr, args.epochs, args.kw, args.seed)
    suffix = args.name or "".join(f"-{k}{v}" for k, v in args.kw.items())
    path = RESULTS / "traces" / f"mlp-bn-{args.recipe}-b{args.batch}-e{args.epochs}-lr{args.base_lr:g}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=None))
    print(json.dumps({k: out[k] for k in ("steps", "summary", "result")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
