"""Tell epoch-aware optimizers (RMSpropWarmup) the fractional epoch of every optimizer step, from Trainer state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_lbo.compat import callback_bases
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup

if TYPE_CHECKING:
    import pytorch_lightning as pl


def fractional_epoch(epoch: int, batch_idx: int, num_training_batches: int, accumulate_grad_batches: int) -> float:
    """Fractional epoch of the optimizer step that consumes batch ``batch_idx`` of epoch ``epoch``.

    With accumulation over ``k`` batches an epoch has ``ceil(num_training_batches / k)`` optimizer steps
    (Lightning steps on the last, possibly short, window too); step ``j = batch_idx // k`` of the epoch
    is at ``epoch + j / steps_per_epoch``. So optimizer step ``n`` of the run is at ``n / steps_per_epoch``,
    the same as ``RMSpropWarmup(steps_per_epoch=...)`` counts.

    >>> fractional_epoch(2, 7, 10, 4)  # 3 steps per epoch; batch 7 belongs to step 1
    2.3333333333333335
    """
    steps_per_epoch = math.ceil(num_training_batches / accumulate_grad_batches)
    return epoch + (batch_idx // accumulate_grad_batches) / steps_per_epoch


class FractionalEpoch(*callback_bases()):
    """Sets the fractional epoch on every :class:`~lightning_lbo.optim.rmsprop_warmup.RMSpropWarmup` each batch.

    The value comes from ``trainer.current_epoch``, the batch index, ``trainer.num_training_batches``
    (after ``limit_train_batches``) and ``trainer.accumulate_grad_batches``, so it is right under gradient
    accumulation and after a resume mid-epoch (Lightning restores the epoch and batch progress).

    Example::

        opt = RMSpropWarmup(model.parameters(), lr=0.8)        # no steps_per_epoch
        Trainer(callbacks=[FractionalEpoch()], accumulate_grad_batches=2).fit(model)
    """

    def __init__(self) -> None:
        self.last_epoch: float | None = None

    def _optimizers(self, trainer: pl.Trainer) -> list[RMSpropWarmup]:
        return [opt for opt in trainer.optimizers if isinstance(opt, RMSpropWarmup)]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = self._optimizers(trainer)
        if not optimizers:
            names = [type(opt).__name__ for opt in trainer.optimizers]
            raise ValueError(f"FractionalEpoch found no RMSpropWarmup optimizer (got {names}); remove the callback "
                             "or return an RMSpropWarmup from configure_optimizers.")
        if any(opt.steps_per_epoch is not None for opt in optimizers):
            raise ValueError("RMSpropWarmup was given steps_per_epoch and the FractionalEpoch callback is also set: "
                             "two sources for the epoch. Drop steps_per_epoch (the callback reads the Trainer) or "
                             "remove the callback.")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        num_batches = trainer.num_training_batches
        if not math.isfinite(num_batches) or num_batches < 1:
            raise ValueError(f"FractionalEpoch needs a sized train dataloader (num_training_batches={num_batches}); "
                             "use RMSpropWarmup(steps_per_epoch=...) instead of the callback.")
        epoch = fractional_epoch(trainer.current_epoch, batch_idx, int(num_batches), trainer.accumulate_grad_batches)
        for opt in self._optimizers(trainer):
            opt.set_fractional_epoch(epoch)
        self.last_epoch = epoch
