"""Goyal et al.'s warmup comparison, small: no warmup vs constant vs gradual warmup at batch 8192.

An MLP with BatchNorm (784-256-128-10; ``--model cnn`` for SmallCNN) on Fashion-MNIST (60k train,
10k test), momentum SGD (Nesterov 0.9, wd 5e-4 on weights only), LR 0.1 per 256 scaled linearly
to 3.2 at batch 8192 (k = 32), 2 warmup epochs, cosine decay to 0 over the rest. The runs are
interleaved per seed and run in one process.

Run from the repository root: ``python docs/scripts/warmup_comparison.py [--epochs 12] [--seeds 0 1]``.
Prints a Markdown table (train loss after the first epochs, final test accuracy) for docs/schedules.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def run(variant: str, epochs: int, seed: int, batch: int, model: str) -> dict[str, float]:
    import pytorch_lightning as pl

    from lightning_lbo.callbacks import LRSchedule
    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.compat import callback_bases
    from lightning_lbo.data import FashionMNISTDataModule
    from lightning_lbo.param_groups import param_groups

    class EpochLoss(*callback_bases()):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self._sum, self._n = 0.0, 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._sum += float(outputs["loss"])
            self._n += 1

        def on_train_epoch_end(self, trainer, module):
            self.losses.append(self._sum / max(1, self._n))
            self._sum, self._n = 0.0, 0

    pl.seed_everything(seed, verbose=False)
    schedule_kw = dict(decay="cosine", reference_batch_size=256)
    if variant == "gradual":
        schedule_kw.update(warmup_epochs=2, warmup="linear")
    elif variant == "constant":
        schedule_kw.update(warmup_epochs=2, warmup="constant")

    def optimizer(module):
        return torch.optim.SGD(param_groups(module, weight_decay=5e-4), lr=0.1, momentum=0.9, nesterov=True)

    model_kwargs = {"batch_norm": True} if model == "mlp" else {}
    module = ClassifierModule(model, optimizer=optimizer, model_kwargs=model_kwargs)
    data = FashionMNISTDataModule(batch_size=batch, eval_batch_size=2000, seed=seed)
    loss = EpochLoss()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[LRSchedule(**schedule_kw), loss])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    return {"loss_e1": loss.losses[0], "loss_e3": loss.losses[min(2, epochs - 1)], "final_loss": loss.losses[-1],
            "test_acc": test["test_acc"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ("none", "constant", "gradual")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for seed in args.seeds:
        for v in variants:
            results[v].append(run(v, args.epochs, seed, args.batch, args.model))
            print(v, seed, results[v][-1], flush=True)
    print(f"\n{args.model}, batch {args.batch}, {args.epochs} epochs, seeds {args.seeds} (mean over seeds)\n")
    print("| warmup | train loss epoch 1 | train loss epoch 3 | final train loss | test accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for v in variants:
        rs = results[v]
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        accs = ", ".join(f"{r['test_acc']:.4f}" for r in rs)
        print(f"| {v} | {mean['loss_e1']:.3f} | {mean['loss_e3']:.3f} | {mean['final_loss']:.3f} | "
              f"{mean['test_acc']:.4f} ({accs}) |")


if __name__ == "__main__":
    main()
