"""The papers' training configurations as one-liners: an optimizer factory plus callbacks.

Each recipe is a function ``(global_batch_size, epochs, steps_per_epoch) -> Recipe``; ``build_recipe``
looks one up by name. A recipe's optimizer factory is called with the LightningModule inside
``configure_optimizers`` (see :class:`lightning_lbo.classifier.ClassifierModule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lbo.classifier import OptimizerFactory


@dataclass(frozen=True)
class Recipe:
    """A named configuration: how to build the optimizer, which callbacks to add, where it comes from."""

    name: str
    source: str
    optimizer: OptimizerFactory
    callbacks: tuple[Any, ...] = field(default_factory=tuple)
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def momentum_sgd(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.1,
                 reference_batch_size: int = 256, warmup_epochs: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True) -> Recipe:
    """Tuned momentum SGD baseline: linear LR scaling, linear warmup, cosine decay (Nado et al. 2021).

    Always shown next to the fancy methods: well-tuned Nesterov momentum matches LARS/LAMB at large
    batch more often than papers admit.
    """
    lr = base_lr * global_batch_size / reference_batch_size
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch)) if total > 1 else 0

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def factory(module: nn.Module) -> dict[str, Any]:
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                              nesterov=nesterov)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Recipe("sgd", "Goyal et al. 2017 (linear scaling, warmup); Nado et al. 2021 (tuned baseline)", factory,
                  hyperparameters=dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                       warmup_steps=warmup, decay="cosine"))


RECIPES: dict[str, Callable[..., Recipe]] = {"sgd": momentum_sgd}


def build_recipe(name: str, global_batch_size: int, epochs: int, steps_per_epoch: int, **overrides: Any) -> Recipe:
    """Build the recipe ``name`` for a global batch size and an epoch budget."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe: {name!r}. Available: {', '.join(sorted(RECIPES))}.")
    if global_batch_size < 1 or epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"Invalid budget: global_batch_size={global_batch_size}, epochs={epochs}, "
                         f"steps_per_epoch={steps_per_epoch}; all must be positive.")
    return RECIPES[name](global_batch_size, epochs, steps_per_epoch, **overrides)
