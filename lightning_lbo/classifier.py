"""A LightningModule that trains any image classifier with any optimizer factory and callbacks.

It is also the reference implementation of the small contract lightning_lbo's callbacks rely on
(a user's own LightningModule only needs the parts a callback names in its docstring):

* ``batch`` is ``(inputs, targets)``;
* ``forward(inputs)`` returns logits ``[N, num_classes]``;
* ``loss_fn(logits, targets)`` returns the mean loss of the batch (a scalar tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_lbo.compat import default_class_attribute, lightning_package, per_package, publish_per_package
from lightning_lbo.models import build_model

#: Called with the LightningModule inside ``configure_optimizers``; returns anything
#: ``configure_optimizers`` may return (an optimizer, a dict with a scheduler, ...).
OptimizerFactory = Callable[[nn.Module], Any]


def _momentum_sgd(module: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), **kwargs)


def sgd_factory(lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
                ) -> OptimizerFactory:
    """Momentum SGD over all parameters: the default optimizer factory.

    A ``functools.partial`` of a module-level function, so the module pickles (``ddp_spawn``).
    """
    return partial(_momentum_sgd, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@per_package
def classifier_module_class(package: str) -> type:
    """The ``ClassifierModule`` class built on ``package``'s Lightning base class (one class per package)."""
    pl = lightning_package(package)

    class ClassifierModule(pl.LightningModule):
        """Cross-entropy classification with accuracy from torchmetrics.

        Args:
            model: an ``nn.Module`` returning logits, or a reference model name (``"cnn"``,
                ``"resnet"``, ``"mlp"``) built with ``model_kwargs``.
            optimizer: factory called with this module in ``configure_optimizers``
                (default: :func:`sgd_factory`). ``lambda m: KFAC(m, lr=0.1)`` binds K-FAC's hooks.
            callbacks: callbacks the module adds to the Trainer (``configure_callbacks``).
            num_classes: number of classes.
            label_smoothing: cross-entropy label smoothing.
            model_kwargs: arguments of the named reference model.

        Example::

            module = ClassifierModule("cnn", optimizer=sgd_factory(lr=0.8))
            Trainer(max_epochs=2).fit(module, datamodule=FashionMNISTDataModule(batch_size=2048))
        """

        def __init__(self, model: nn.Module | str = "cnn", optimizer: OptimizerFactory | None = None,
                     callbacks: Sequence[Any] = (), num_classes: int = 10, label_smoothing: float = 0.0,
                     model_kwargs: dict[str, Any] | None = None) -> None:
            super().__init__()
            if not 0.0 <= label_smoothing < 1.0:
                raise ValueError(f"Invalid label_smoothing: {label_smoothing}; use a value in [0, 1).")
            if optimizer is not None and not callable(optimizer):
                raise TypeError(f"optimizer must be a callable taking the module, got {type(optimizer).__name__}.")
            if isinstance(model, str):
                model = build_model(model, num_classes=num_classes, **(model_kwargs or {}))
            self.model = model
            self.optimizer_factory = optimizer or sgd_factory()
            self.extra_callbacks = list(callbacks)
            self.label_smoothing = label_smoothing
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")
            self.val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes, average="micro")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            loss = self.loss_fn(logits, y)
            self.train_acc(logits.detach(), y)
            self.log("train_loss", loss.detach(), prog_bar=True)
            self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
            return loss

        def _evaluate(self, batch: Any, metric: MulticlassAccuracy, prefix: str) -> None:
            x, y = batch
            logits = self(x)
            self.log(f"{prefix}_loss", self.loss_fn(logits, y), sync_dist=True)
            metric(logits, y)
            self.log(f"{prefix}_acc", metric, prog_bar=prefix == "val")

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._evaluate(batch, self.val_acc, "val")

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._evaluate(batch, self.test_acc, "test")

        def configure_optimizers(self) -> Any:
            return self.optimizer_factory(self)

        def configure_callbacks(self) -> list[Any]:
            return list(self.extra_callbacks)

    return publish_per_package(ClassifierModule, __name__, package)


# The pytorch_lightning class, built on first access: importing this module imports no Lightning package.
__getattr__ = default_class_attribute(__name__, "ClassifierModule", classifier_module_class)
