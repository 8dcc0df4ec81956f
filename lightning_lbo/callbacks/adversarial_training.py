"""Adversarial training with FGSM examples, alone or with adaptive batch size (ABSA; Yao et al. 2018).

A fraction ``ratio`` of every training batch is replaced by FGSM examples ``x + eps sign(grad_x L)``
(clamped to the data range) generated in eval mode, so batch-norm statistics are untouched by the
generation. With :class:`~lightning_lbo.callbacks.AdaptiveBatchSize` in the same Trainer the ratio is
halved on every doubling of the batch (``ratio / factor``, whatever the rule and mechanism), and the examples stop
once the batch reaches its maximum. They stop in any case after ``stop_fraction`` of training.

Mechanism: ``on_train_batch_start`` writes the examples into the batch's input tensor **in place**
(``x[:n] = x_adv``); Lightning passes that same object to ``training_step``. The batch must therefore
be a fresh tensor per step (true of every collate function and of lightning_lbo's data module); a
dataset that yields views into its own storage would be modified.

Contract with the LightningModule: a batch is ``(x, y)`` (a tuple or list whose first two items are
inputs and targets), ``module(x)`` returns logits, ``module.loss_fn(logits, y)`` returns the mean loss
(cross-entropy if the module has no ``loss_fn``). The data range comes from ``data_range`` or the
datamodule's ``data_range`` attribute (``FashionMNISTDataModule`` has one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_lbo.adversarial import replace_with_adversarial
from lightning_lbo.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_lbo.compat import callback_bases


class AdversarialTraining(*callback_bases()):
    """Replace a fraction of each training batch with FGSM examples (ABSA with :class:`AdaptiveBatchSize`).

    Args:
        ratio: fraction of each batch replaced (paper: 0.2).
        epsilon: FGSM step in input units (paper: 0.005).
        stop_fraction: no more examples after this fraction of training (of ``max_epochs``, counted
            in batches within an epoch, or of ``max_steps`` when no epoch limit is set; paper: 0.5).
            1 keeps them to the end.
        data_range: ``(low, high)`` the inputs are clamped to; default: ``trainer.datamodule.data_range``.
        stop_at_max_batch: with AdaptiveBatchSize, stop once the batch reached its maximum (paper).

    Logged: ``adversarial/ratio`` (the ratio in use) every epoch.

    Example::

        trainer = Trainer(callbacks=[AdaptiveBatchSize(max_factor=16), AdversarialTraining(ratio=0.2)])
        trainer.fit(module, datamodule=FashionMNISTDataModule(batch_size=128))
    """

    def __init__(self, ratio: float = 0.2, epsilon: float = 0.005, stop_fraction: float = 0.5,
                 data_range: tuple[float, float] | None = None, stop_at_max_batch: bool = True) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"Invalid ratio: {ratio}; use a value in (0, 1] (paper: 0.2).")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"Invalid epsilon: {epsilon}; use a positive step in input units (paper: 0.005).")
        if not 0.0 < stop_fraction <= 1.0:
            raise ValueError(f"Invalid stop_fraction: {stop_fraction}; use a value in (0, 1] (paper: 0.5).")
        if data_range is not None and not (len(data_range) == 2 and data_range[0] < data_range[1]):
            raise ValueError(f"Invalid data_range: {data_range}; give (low, high) with low < high.")
        self.ratio, self.epsilon, self.stop_fraction = ratio, epsilon, stop_fraction
        self.data_range, self.stop_at_max_batch = data_range, stop_at_max_batch
        self._range: tuple[float, float] | None = None
        self._abs: AdaptiveBatchSize | None = None
        self.replaced = 0

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._range = self.data_range or getattr(trainer.datamodule, "data_range", None)
        if self._range is None:
            raise ValueError("AdversarialTraining needs the input range to clamp to: pass "
                             "AdversarialTraining(data_range=(low, high)) or give the datamodule a data_range "
                             "attribute.")
        self._abs = next((cb for cb in trainer.callbacks if isinstance(cb, AdaptiveBatchSize)), None)

    def current_ratio(self, trainer: Any, batch_idx: int = 0) -> float:
        """The ratio in use for batch ``batch_idx`` of the epoch: 0 once switched off, halved per batch doubling."""
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            # within the epoch by batches (the epoch's length as read at its start): in a short run a whole-epoch
            # granularity would stop late (at epoch 3 of 5 for half of training: 0.6)
            batches = trainer.num_training_batches
            within = batch_idx / batches if isinstance(batches, int) and batches > 0 else 0.0
            progress = (trainer.current_epoch + within) / trainer.max_epochs
        elif trainer.max_steps and trainer.max_steps > 0:
            progress = trainer.global_step / trainer.max_steps
        else:
            progress = 0.0
        if progress >= self.stop_fraction:
            return 0.0
        if self._abs is None:
            return self.ratio
        if self.stop_at_max_batch and self._abs.at_maximum:
            return 0.0
        return self.ratio / self._abs.factor

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        pl_module.log("adversarial/ratio", self.current_ratio(trainer), on_epoch=True, on_step=False)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        ratio = self.current_ratio(trainer, batch_idx)
        if ratio == 0.0:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise TypeError(f"AdversarialTraining expects a batch (x, y, ...) of tensors, got {type(batch).__name__}; "
                            "see the contract in lightning_lbo.callbacks.adversarial_training.")
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        self.replaced += replace_with_adversarial(pl_module, batch[0], batch[1], ratio, self.epsilon, self._range,
                                                  loss_fn)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"replaced": self.replaced}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.replaced = int(state_dict.get("replaced", 0))
