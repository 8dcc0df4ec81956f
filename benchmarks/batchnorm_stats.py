"""Evaluation accuracy with BN running averages vs last-batch statistics (Akiba) vs precise BN.

One training run of a SmallCNN on Fashion-MNIST at a large batch; at the end of every epoch the
*same weights* are evaluated three ways, side by side:

* ``running_avg``: torch's exponential moving averages (momentum 0.1), as a plain run would use;
* ``last_batches``: ``BatchNormStats(mode="last_batches")`` installs the pooled statistics of the last
  ``--last-k`` training batches;
* ``precise``: ``BatchNormStats(mode="precise")`` recomputes population statistics over
  ``--precise-batches`` training batches.

The moving averages are put back after each evaluation, so they evolve exactly as without the
callbacks (training itself never reads them). Prints one row per epoch and a CSV line at the end.

    python benchmarks/batchnorm_stats.py --batch-size 2048 --epochs 8
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_lbo.batchnorm import BatchNormMomentRecorder, batchnorm_layers
from lightning_lbo.callbacks.batchnorm_stats import BatchNormStats
from lightning_lbo.classifier import ClassifierModule
from lightning_lbo.compat import callback_bases, lightning_package
from lightning_lbo.data import FashionMNISTDataModule, TensorImageDataset, tensor_loader
from lightning_lbo.models import SmallCNN


def warmup_sgd(lr: float, warmup_steps: int, weight_decay: float = 5e-4):
    """Momentum SGD with a per-step linear warm-up to ``lr`` (the large-batch standard)."""

    def factory(module):
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return factory


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / total


class ThreeWayEvaluation(*callback_bases()):
    """At each epoch end: accuracy with running averages, last-batch stats and precise stats."""

    def __init__(self, last: BatchNormStats, precise: BatchNormStats, val_loader) -> None:
        self.last, self.precise, self.val_loader = last, precise, val_loader
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        layers = batchnorm_layers(pl_module)
        ema = [(b.running_mean.clone(), b.running_var.clone()) for b in layers]
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        row["running_avg"] = accuracy(pl_module, self.val_loader)
        t0 = time.perf_counter()
        self.last.refresh(trainer, pl_module)
        row["last_s"] = time.perf_counter() - t0
        row["last_batches"] = accuracy(pl_module, self.val_loader)
        t0 = time.perf_counter()
        self.precise.refresh(trainer, pl_module)
        row["precise_s"] = time.perf_counter() - t0
        row["precise"] = accuracy(pl_module, self.val_loader)
        with torch.no_grad():
            for b, (mean, var) in zip(layers, ema, strict=True):
                b.running_mean.copy_(mean)
                b.running_var.copy_(var)
        self.rows.append(row)
        print(f"epoch {row['epoch']:2d} step {row['step']:4d}  running_avg {row['running_avg']:.4f}  "
              f"last_batches {row['last_batches']:.4f}  precise {row['precise']:.4f}  "
              f"(estimation s: last {row['last_s']:.2f}, precise {row['precise_s']:.2f})", flush=True)


def hook_overhead(batch_size: int, steps: int) -> float:
    """Training-step time with the last-batches hooks / without, interleaved step by step (median ratio)."""
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = BatchNormMomentRecorder(batchnorm_layers(model), window=1)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * steps + 2):
        hooked = bool(i % 2)
        recorder.attach() if hooked else recorder.detach()
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # first two steps warm up
            times[hooked].append(time.perf_counter() - t0)
    ratios = sorted(a / b for a, b in zip(times[True], times[False], strict=True))
    return ratios[len(ratios) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--val-size", type=int, default=5000, help="test images evaluated")
    parser.add_argument("--last-k", type=int, default=1)
    parser.add_argument("--precise-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-steps", type=int, default=20, help="steps of the hook-overhead timing (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pl = lightning_package("pytorch_lightning")
    if args.overhead_steps:
        ratio = hook_overhead(args.batch_size // 4, args.overhead_steps)
        print(f"last_batches hooks: training step time ratio (hooked / plain, median of {args.overhead_steps} "
              f"interleaved pairs, batch {args.batch_size // 4}): {ratio:.3f}", flush=True)

    dm = FashionMNISTDataModule(batch_size=args.batch_size, train_subset=args.train_subset, drop_last=True)
    dm.setup("fit")
    val = tensor_loader(TensorImageDataset(dm.test_set.images[: args.val_size], dm.test_set.labels[: args.val_size]),
                        1000, shuffle=False)
    steps_per_epoch = len(dm.train_set) // args.batch_size
    module = ClassifierModule(SmallCNN(), optimizer=warmup_sgd(args.lr, int(args.warmup_epochs * steps_per_epoch)))
    last = BatchNormStats(mode="last_batches", num_batches=args.last_k)
    precise = BatchNormStats(mode="precise", num_batches=args.precise_batches)
    evaluation = ThreeWayEvaluation(last, precise, val)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[last, precise, evaluation])
    print(f"SmallCNN, Fashion-MNIST {len(dm.train_set)} train / {args.val_size} test images, batch {args.batch_size}, "
          f"{steps_per_epoch} steps/epoch, lr {args.lr} (warm-up {args.warmup_epochs} epochs), "
          f"last_k {args.last_k}, precise_batches {args.precise_batches}", flush=True)
    t0 = time.perf_counter()
    trainer.fit(module, dm.train_dataloader())
    print(f"total {time.perf_counter() - t0:.0f} s")
    final = evaluation.rows[-1]
    print("csv,batch_size,epochs,running_avg,last_batches,precise")
    print(f"csv,{args.batch_size},{args.epochs},{final['running_avg']:.4f},{final['last_batches']:.4f},"
          f"{final['precise']:.4f}")


if __name__ == "__main__":
    main()
