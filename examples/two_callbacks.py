"""Large-batch training in your own Trainer: add two callbacks, change nothing else.

``LRSchedule`` scales the LR to the global batch (linear rule from batch 256), warms it up and decays
it once per optimizer step; ``BatchNormStats`` recomputes exact BN statistics before each validation
(large batches make running averages lag). The LightningModule keeps its own ``configure_optimizers``
(here: plain momentum SGD at the LR tuned for batch 256).

    python examples/two_callbacks.py                      # batch 4096, 3 epochs, MLP-BN
    python examples/two_callbacks.py --model cnn --epochs 5
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from lightning_lbo.callbacks import BatchNormStats, LRSchedule
from lightning_lbo.classifier import ClassifierModule
from lightning_lbo.data import FashionMNISTDataModule


class SGDAt256:
    """Momentum SGD with the LR tuned for batch 256; LRSchedule scales it (a class, so ddp_spawn can pickle it)."""

    def __call__(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main(argv: Sequence[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096, help="per-device batch size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn", "resnet"))
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)

    model_kwargs = {"batch_norm": True} if args.model == "mlp" else {}
    module = ClassifierModule(args.model, optimizer=SGDAt256(), model_kwargs=model_kwargs)
    data = FashionMNISTDataModule(batch_size=args.batch_size, train_subset=args.train_subset, drop_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=args.devices, logger=False, enable_checkpointing=False,
        callbacks=[
            LRSchedule(warmup_epochs=0.5, decay="cosine", reference_batch_size=256),  # 1. scale, warm up, decay
            BatchNormStats(mode="precise", num_batches=4),                           # 2. exact BN statistics
        ],
    )
    trainer.fit(module, datamodule=data)
    print(f"validation accuracy after {trainer.global_step} steps: {float(trainer.callback_metrics['val_acc']):.4f}")
    return trainer


if __name__ == "__main__":
    main()
