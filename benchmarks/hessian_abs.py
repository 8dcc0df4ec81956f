"""Hessian-vector product cost, and ABS / ABSA against fixed batches on Fashion-MNIST.

Part 1 (``hvp``): on SmallCNN with a Fashion-MNIST batch, the median time of a training step (forward,
backward, SGD step), of an uncached HVP (forward, backward with ``create_graph``, double backward), and
of a cached HVP (double backward through a kept graph, as ``HessianOperator`` does with one batch).
The three are interleaved in one process so machine load hits them alike; ratios to the training step
are printed.

Part 2 (``abs``): the CIFAR-style schedule of Yao et al. 2018 (constant LR, x0.1 at 75% of training;
ABS doubles the batch through gradient accumulation when the top eigenvalue halves or after
``duration`` epochs, LR scaled alike) on a Fashion-MNIST subset. Runs: fixed base batch, fixed maximum
batch (same LR scaling), ABS, ABSA (ABS + FGSM ratio 0.2, eps 0.005). Printed per run: optimizer
steps, final test accuracy, the batch schedule, wall time.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/hessian_abs.py
    python benchmarks/hessian_abs.py --part hvp --repeats 30
    python benchmarks/hessian_abs.py --part abs --epochs 8 --train-subset 20000
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn


def hvp_cost(batch_size: int, repeats: int) -> None:
    from lightning_lbo.data import FashionMNISTFiles, TensorImageDataset, load_split, locate_fashion_mnist
    from lightning_lbo.hessian import HessianOperator, classifier_loss, random_vector
    from lightning_lbo.models import SmallCNN

    files: FashionMNISTFiles = locate_fashion_mnist()
    images, labels = load_split(files, "train")
    x, y = TensorImageDataset(images[:batch_size], labels[:batch_size])[list(range(batch_size))]
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    uncached = HessianOperator(model, [(x, y)], loss_fn=classifier_loss, cache_graph=False)
    cached = HessianOperator(model, [(x, y)], loss_fn=classifier_loss, bn_mode="eval")
    v = random_vector(uncached.numel, 0)
    timings: dict[str, list[float]] = {"train_step": [], "hvp_uncached": [], "hvp_cached": []}

    funcs = {"train_step": train_step, "hvp_uncached": lambda: uncached.matvec(v),
             "hvp_cached": lambda: cached.matvec(v)}
    model.eval()  # the HVPs use eval-mode BN; time the step in the same mode so only the passes differ
    # The cached graph must not see parameter updates: rebuild it (untimed) after each training step.
    for i in range(repeats + 2):
        for name, f in funcs.items():
            if name == "hvp_cached":
                cached.release()
                cached.matvec(v)
            t = time.perf_counter()
            f()
            if i < 2:  # warm-up rounds
                continue
            timings[name].append(time.perf_counter() - t)
    base = statistics.median(timings["train_step"])
    print(f"\nHVP cost, SmallCNN ({uncached.numel} parameters), batch {batch_size}, {repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'pass':<14}{'median ms':>10}{'x train step':>14}")
    for name, ts in timings.items():
        med = statistics.median(ts)
        print(f"{name:<14}{med * 1e3:>10.1f}{med / base:>14.2f}")


def abs_schedule(epochs: int, train_subset: int, batch_size: int, max_accumulation: int, duration: int,
                 lr: float, seed: int) -> None:
    import pytorch_lightning as pl

    from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
    from lightning_lbo.callbacks.adversarial_training import AdversarialTraining
    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.data import fashion_mnist_datamodule_class

    milestone = max(1, int(0.75 * epochs))

    def factory(scale: float):
        def make(module: nn.Module):
            opt = torch.optim.SGD(module.parameters(), lr=lr * scale, momentum=0.9, weight_decay=5e-4)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], 0.1)}
        return make

    runs = {
        f"fixed {batch_size}": (1, factory(1.0), lambda: []),
        f"fixed {batch_size * max_accumulation}": (max_accumulation, factory(max_accumulation), lambda: []),
        "ABS": (1, factory(1.0), lambda: [AdaptiveBatchSize(max_accumulation=max_accumulation, duration=duration)]),
        "ABSA": (1, factory(1.0), lambda: [AdaptiveBatchSize(max_accumulation=max_accumulation, duration=duration),
                                           AdversarialTraining(ratio=0.2, epsilon=0.005)]),
    }
    rows = []
    for name, (accumulate, make_opt, make_callbacks) in runs.items():
        pl.seed_everything(seed, verbose=False)
        dm = fashion_mnist_datamodule_class("pytorch_lightning")(batch_size=batch_size, train_subset=train_subset,
                                                                 drop_last=True, eval_batch_size=1000, seed=seed)
        callbacks = make_callbacks()
        module = ClassifierModule("cnn", optimizer=make_opt)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accumulate_grad_batches=accumulate, callbacks=callbacks, num_sanity_val_steps=0,
                             check_val_every_n_epoch=epochs)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        wall = time.perf_counter() - start
        acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
        abs_cb = next((cb for cb in callbacks if isinstance(cb, AdaptiveBatchSize)), None)
        schedule = ([batch_size * h["next_factor"] for h in abs_cb.history] if abs_cb
                    else [batch_size * accumulate] * epochs)
        eigs = [f"{h['measurement']:.1f}" for h in abs_cb.history] if abs_cb else []
        rows.append((name, trainer.global_step, acc, wall, schedule, eigs))
        print(f"finished {name}: {trainer.global_step} steps, test acc {acc:.4f}", flush=True)
    print(f"\nABS on Fashion-MNIST ({train_subset} train images, full test set), SmallCNN, {epochs} epochs, "
          f"base LR {lr} per {batch_size}, x0.1 at epoch {milestone}, max batch {batch_size * max_accumulation}, "
          f"duration {duration}, seed {seed}")
    print(f"{'run':<12}{'steps':>7}{'test acc':>10}{'wall s':>8}  batch per epoch (after each epoch's decision)")
    for name, steps, acc, wall, schedule, eigs in rows:
        print(f"{name:<12}{steps:>7}{acc:>10.4f}{wall:>8.0f}  {schedule}" + (f"  top eig {eigs}" if eigs else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "hvp", "abs"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hvp-batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-accumulation", type=int, default=8)
    parser.add_argument("--duration", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.part in ("all", "hvp"):
        hvp_cost(args.hvp_batch, args.repeats)
    if args.part in ("all", "abs"):
        abs_schedule(args.epochs, args.train_subset, args.batch_size, args.max_accumulation, args.duration, args.lr,
                     args.seed)


if __name__ == "__main__":
    main()
