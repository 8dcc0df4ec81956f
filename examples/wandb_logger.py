"""Log a large-batch recipe to Weights & Biases (offline: no account or network needed).

The recipe's callbacks log through ``pl_module.log`` (LR per param group, K-FAC damping and refresh
counts, BN sample counts), so any Lightning logger records them. Offline runs are written to
``./wandb`` and can be uploaded later with ``wandb sync``.

    pip install wandb
    python examples/wandb_logger.py --recipe kfac --epochs 2
    wandb sync wandb/offline-run-*          # optional, later
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pytorch_lightning as pl

from lightning_lbo.classifier import ClassifierModule
from lightning_lbo.data import FashionMNISTDataModule
from lightning_lbo.recipes import RECIPES, build_recipe


def main(argv: Sequence[str] | None = None) -> pl.Trainer | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="kfac", choices=tuple(RECIPES))
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--save-dir", default=".")
    args = parser.parse_args(argv)
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        print(f"{err}\nThis example needs wandb: `pip install wandb` (or `pip install lightning-lbo[wandb]`).",
              file=sys.stderr)
        return None
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="lightning_lbo", name=f"{args.recipe}-{args.batch_size}", offline=True,
                         save_dir=args.save_dir)

    data = FashionMNISTDataModule(batch_size=args.batch_size, train_subset=args.train_subset, drop_last=True)
    data.setup("fit")
    recipe = build_recipe(args.recipe, args.batch_size, args.epochs, len(data.train_set) // args.batch_size)
    module = ClassifierModule("mlp", optimizer=recipe.optimizer, model_kwargs={"batch_norm": True})
    logger.log_hyperparams({"recipe": recipe.name, "source": recipe.source, **recipe.hyperparameters})
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=logger, log_every_n_steps=1,
                         callbacks=list(recipe.callbacks), enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    return trainer


if __name__ == "__main__":
    main()
