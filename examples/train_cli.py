"""Train with LightningCLI: model, data, optimizer, callbacks and strategy of a recipe from one YAML file.

One config per recipe in ``examples/configs/`` (sgd, goyal, lars, ...), each a paper's configuration
at global batch 4096 on Fashion-MNIST::

    python examples/train_cli.py fit --config examples/configs/goyal.yaml
    python examples/train_cli.py fit --config examples/configs/lars.yaml --trainer.max_epochs 2
    python examples/train_cli.py fit --config examples/configs/sgd.yaml --trainer.fast_dev_run 2

Anything can be overridden on the command line (``--data.batch_size 8192``,
``--trainer.devices 2 --trainer.strategy ddp_spawn``); ``--print_config`` shows the merged result.
The optimizer is the ``model.optimizer`` factory (a recipe factory from :mod:`lightning_lbo.recipes`,
so parameter groups such as "no weight decay on BN and biases" can be configured), and the LR
schedule is the :class:`~lightning_lbo.callbacks.LRSchedule` callback: it steps per optimizer step,
unlike LightningCLI's ``lr_scheduler`` section, which steps per epoch.

Short smoke runs (``--trainer.fast_dev_run 2``, ``--trainer.max_steps 3``) work with every config:
a warmup that does not fit the shortened run is shortened, with a warning. The merged config is
saved next to the logger's files (``config.yaml`` in its version directory); with
``--trainer.logger false`` nothing is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from lightning_lbo.classifier import ClassifierModule
from lightning_lbo.data import FashionMNISTDataModule


class SaveConfigBesideLogs(SaveConfigCallback):
    """Save the merged config beside the logger's files; without a logger, save nothing.

    Lightning's callback would write ``config.yaml`` into the working directory when there is no
    logger (``trainer.log_dir`` falls back to ``default_root_dir``).
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)


def main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the CLI (``args=None`` reads ``sys.argv``); ``run=False`` only instantiates the objects."""
    warnings.filterwarnings("ignore", message=".*(LeafSpec|litlogger|does not have many workers).*")
    return LightningCLI(ClassifierModule, FashionMNISTDataModule, args=args, run=run,
                        save_config_callback=SaveConfigBesideLogs, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
