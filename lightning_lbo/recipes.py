"""The papers' large-batch configurations as one-liners: an optimizer factory plus callbacks.

Each recipe is a function ``(global_batch_size, epochs, steps_per_epoch, **overrides) -> Recipe``;
:func:`build_recipe` looks one up by name. A recipe's ``optimizer`` is called with the LightningModule
inside ``configure_optimizers``; its ``callbacks`` go to the Trainer. Learning rates are given for the
papers' reference batch of 256 and scaled to the Trainer's global batch by the
:class:`~lightning_lbo.callbacks.LRSchedule` callback; warmup and decay lengths are the papers'
fractions of their 90-epoch ImageNet runs applied to this run's ``epochs`` (for example Goyal's 5 of
90 epochs of warmup). Factories and callbacks pickle, so recipes also run under ``ddp_spawn``.

Example::

    r = recipes.build_recipe("goyal", global_batch_size=4096, epochs=10, steps_per_epoch=14)
    model = ClassifierModule("resnet", optimizer=r.optimizer)
    Trainer(max_epochs=10, callbacks=list(r.callbacks)).fit(model, datamodule=dm)

Sources, hyperparameters and the paper's numbers next to ours: ``docs/recipes.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_lbo.compat import callback_bases

REFERENCE_BATCH = 256  # every paper states its LR for (or scales it from) batch 256
PAPER_EPOCHS = 90  # the ImageNet runs the fractions below come from


@dataclass(frozen=True)
class Recipe:
    """A named configuration: how to build the optimizer, which callbacks to add, where it comes from.

    Attributes:
        name: the recipe's key in :data:`RECIPES`.
        source: the paper(s).
        optimizer: ``factory(pl_module)``, the return value of ``configure_optimizers``.
        callbacks: callbacks for the Trainer (fresh instances per recipe call).
        hyperparameters: everything the recipe chose, for logs and the docs.
    """

    name: str
    source: str
    optimizer: Callable[[nn.Module], Any]
    callbacks: tuple[Any, ...] = ()
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SGDFactory:
    """``torch.optim.SGD`` over :func:`~lightning_lbo.param_groups.param_groups` (no decay on norms/biases)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    decay_norms: bool = True

    def __call__(self, module: nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.param_groups import param_groups

        groups = ([{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": self.weight_decay}]
                  if self.decay_norms else param_groups(module, self.weight_decay))
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)


@dataclass(frozen=True)
class LARSFactory:
    """:class:`~lightning_lbo.optim.lars.LARS` with biases and norm layers out of the trust ratio and decay."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001

    def __call__(self, module: nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.optim.lars import LARS
        from lightning_lbo.param_groups import param_groups

        return LARS(param_groups(module, self.weight_decay), lr=self.lr, momentum=self.momentum,
                    weight_decay=self.weight_decay, trust_coefficient=self.trust_coefficient, momentum_form="paper")


class ZeroGammaInit(*callback_bases()):
    """Goyal et al.'s zero-init of gamma in the last BN of each residual block, once, at the start of a fresh fit.

    Runs in ``on_fit_start`` only when no checkpoint is being restored (a resumed run keeps its
    trained gammas). Models without residual blocks (the SmallCNN) are left unchanged.

    Example::

        Trainer(callbacks=[ZeroGammaInit()]).fit(ClassifierModule("resnet"), datamodule=dm)
    """

    def __init__(self) -> None:
        self.zeroed = 0

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning_lbo.param_groups import last_bn_of_blocks

        if trainer.ckpt_path is not None:
            return
        bns = last_bn_of_blocks(pl_module)
        with torch.no_grad():
            for bn in bns:
                bn.weight.zero_()
        self.zeroed = len(bns)


def _fraction(epochs: float, paper_epochs: float) -> float:
    """``paper_epochs`` of a 90-epoch run, as epochs of a run of ``epochs``."""
    return epochs * paper_epochs / PAPER_EPOCHS


def momentum_sgd(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: float | None = None,
                 nesterov: bool = True) -> Recipe:
    """Tuned momentum-SGD baseline (Nado et al. 2021): Nesterov, linear scaling, warmup, cosine decay.

    Always shown next to the fancy methods: well-tuned Nesterov momentum matches LARS/LAMB at large
    batch more often than papers admit. LR ``base_lr * B / 256``; linear warmup from 0 over 10% of
    the run (at most 2 epochs), then cosine to 0; weight decay on every parameter.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = min(2.0, 0.1 * epochs) if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="cosine",
                          reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "sgd", "Nado et al. 2021 (arXiv 2102.06356): tuned Nesterov momentum; Goyal et al. 2017 scaling rule",
        SGDFactory(base_lr, momentum, weight_decay, nesterov=nesterov, decay_norms=True), (schedule,),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum, nesterov=nesterov,
             weight_decay=weight_decay, warmup_epochs=warmup, warmup_from=0.0, decay="cosine"))


def goyal(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.1, momentum: float = 0.9,
          weight_decay: float = 1e-4, warmup_epochs: float | None = None, nesterov: bool = True) -> Recipe:
    """Goyal et al. 2017: momentum SGD, linear scaling, gradual warmup, zero-gamma, no decay on BN/biases.

    LR ``0.1 * B / 256``; linear warmup from the unscaled LR (factor ``1/k``) over 5 of 90 epochs;
    LR / 10 at epochs 30, 60, 80 of 90 (scaled to the run); weight decay 1e-4 except BN and biases;
    Nesterov momentum 0.9 (LR outside the buffer, torch's form, so no momentum correction is needed);
    zero-init gamma of the last BN in each residual block.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = _fraction(epochs, 5) if warmup_epochs is None else warmup_epochs
    milestones = tuple(_fraction(epochs, e) for e in (30, 60, 80))
    schedule = LRSchedule(warmup_epochs=warmup, decay="step", milestones=milestones, gamma=0.1,
                          reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "goyal", "Goyal et al. 2017, Accurate, Large Minibatch SGD (arXiv 1706.02677)",
        SGDFactory(base_lr, momentum, weight_decay, nesterov=nesterov, decay_norms=False), (schedule, ZeroGammaInit()),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum, nesterov=nesterov,
             weight_decay=weight_decay, no_decay="BN and biases", warmup_epochs=warmup,
             warmup_from=REFERENCE_BATCH / global_batch_size, milestones_epochs=milestones, gamma=0.1,
             zero_gamma=True))


def lars(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.4, momentum: float = 0.9,
         weight_decay: float = 5e-4, trust_coefficient: float = 0.001, warmup_epochs: float | None = None,
         power: float = 2.0) -> Recipe:
    """You, Gitman, Ginsburg 2017 (LARS): layer-wise trust ratio, warmup, poly(2) decay.

    Trust coefficient 0.001, momentum 0.9 with the LR inside the buffer (the paper's form), weight
    decay 5e-4 inside the trust ratio; biases and BN excluded from trust ratio and decay (MLPerf);
    LR ``base_lr * B / 256`` after a linear warmup from 0 over 10% of the run (the paper warms up
    2-12 of 90 epochs; MLPerf 17 of 60), then ``(1 - t/T)^2``; momentum correction on LR changes.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="poly", power=power,
                          reference_batch_size=REFERENCE_BATCH, momentum_correction=True)
    return Recipe(
        "lars", "You, Gitman, Ginsburg 2017, Large Batch Training of Convolutional Networks (arXiv 1708.03888)",
        LARSFactory(base_lr, momentum, weight_decay, trust_coefficient), (schedule,),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum,
             momentum_form="paper", weight_decay=weight_decay, trust_coefficient=trust_coefficient,
             no_adapt_no_decay="BN and biases", warmup_epochs=warmup, warmup_from=0.0, decay=f"poly({power:g})",
             momentum_correction=True))


RECIPES: dict[str, Callable[..., Recipe]] = {"sgd": momentum_sgd, "goyal": goyal, "lars": lars}


def build_recipe(name: str, global_batch_size: int, epochs: int, steps_per_epoch: int, **overrides: Any) -> Recipe:
    """Build the recipe ``name`` for a global batch size and an epoch budget.

    Args:
        name: a key of :data:`RECIPES`.
        global_batch_size: examples per optimizer step over all devices.
        epochs: the training budget the schedules are fitted to.
        steps_per_epoch: optimizer steps per epoch at ``global_batch_size``.
        overrides: keyword arguments of the recipe function (e.g. ``base_lr=0.2``).
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe: {name!r}. Available: {', '.join(RECIPES)}.")
    for arg, value in (("global_batch_size", global_batch_size), ("epochs", epochs),
                       ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {arg}: {value!r}; use a positive integer.")
    return RECIPES[name](global_batch_size, epochs, steps_per_epoch, **overrides)
