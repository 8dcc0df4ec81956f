"""Validation accuracy after one NaN training batch, without and with NonFiniteBatchGuard (Fashion-MNIST).

Four runs of the SmallCNN (conv-BN-ReLU x3) with LAMB on the 60k training images, same seed and batch
order: ``clean`` (no bad batch), ``nan`` (the inputs of one batch set to NaN, no guard: LAMB skips the
step, but BatchNorm's running statistics take the NaN in the forward pass), ``nan_guard`` (the same with
the guard) and ``dropped`` (that batch removed from the data: what the guarded run must equal, bit for
bit). Each run is one benchmark unit under the shared lock and is cached in
``benchmarks/results/nonfinite_batch_accuracy.json`` so an interrupted study resumes.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/nonfinite_batch_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.bench_lock import bench_lock

RESULTS = Path(__file__).parent / "results" / "nonfinite_batch_accuracy.json"
RUNS = ("clean", "nan", "nan_guard", "dropped")


def _batches(dm, skip: int | None) -> list:
    """The training batches in the data module's (seeded) order, optionally without batch ``skip``."""
    out = [(x.clone(), y.clone()) for x, y in dm.train_dataloader()]
    return [b for i, b in enumerate(out) if i != skip]


def run(name: str, args: argparse.Namespace) -> dict:
    import pytorch_lightning as pl

    from lightning_lbo.callbacks.nonfinite_batches import NonFiniteBatchGuard
    from lightning_lbo.classifier import classifier_module_class
    from lightning_lbo.data import fashion_mnist_datamodule_class
    from lightning_lbo.optim.lamb import LAMB

    torch.manual_seed(0)
    dm = fashion_mnist_datamodule_class("pytorch_lightning")(batch_size=args.batch_size)
    dm.setup()
    batches = _batches(dm, args.bad_batch if name == "dropped" else None)
    if name in ("nan", "nan_guard"):
        batches[args.bad_batch][0].fill_(float("nan"))
    module = classifier_module_class("pytorch_lightning")(
        "cnn", optimizer=lambda m: LAMB(m.parameters(), lr=args.lr, weight_decay=1e-2))
    callbacks = [NonFiniteBatchGuard()] if name == "nan_guard" else []
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), val_dataloaders=dm.val_dataloader())
    seconds = time.perf_counter() - start
    weights = torch.cat([t.detach().reshape(-1).double() for t in module.state_dict().values()])
    return {"val_acc": float(trainer.callback_metrics["val_acc"]), "seconds": round(seconds, 1),
            "bn_running_mean_finite": bool(torch.isfinite(module.model.features[1].running_mean).all()),
            "state_checksum": float(weights.nan_to_num(nan=-1.0).sum()),
            "skips": int(trainer.optimizers[0].nonfinite_skips)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--bad-batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items()}
    cache = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "runs": {}}
    for name in RUNS:
        if name in cache["runs"]:
            continue
        with bench_lock():
            load = os.getloadavg()[0]
            cache["runs"][name] = {**run(name, args), "load_before": round(load, 1)}
        cache["machine"] = (f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
                            f"{args.threads} threads, malloc env "
                            f"{ {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')} or 'default'}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(cache, indent=2) + "\n")
        print(name, cache["runs"][name], flush=True)
    runs = cache["runs"]
    print(f"{'run':<10}{'val_acc':>9}{'BN finite':>11}{'skips':>7}")
    for name in RUNS:
        r = runs[name]
        print(f"{name:<10}{r['val_acc']:>9.4f}{str(r['bn_running_mean_finite']):>11}{r['skips']:>7}")
    print("nan_guard equals dropped (val_acc and state checksum):",
          runs["nan_guard"]["val_acc"] == runs["dropped"]["val_acc"]
          and runs["nan_guard"]["state_checksum"] == runs["dropped"]["state_checksum"])


if __name__ == "__main__":
    main()
