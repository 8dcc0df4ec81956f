"""The papers' large-batch configurations as one-liners: an optimizer factory plus callbacks.

Each recipe is a function ``(global_batch_size, epochs, steps_per_epoch, **overrides) -> Recipe``;
:func:`build_recipe` looks one up by name. A recipe's ``optimizer`` is called with the LightningModule
inside ``configure_optimizers``; its ``callbacks`` go to the Trainer. Learning rates are given for the
papers' reference batch of 256 and scaled to the Trainer's global batch by the
:class:`~lightning_lbo.callbacks.LRSchedule` callback; each default ``base_lr`` is the value the
large-batch study (``benchmarks/study.py``, Fashion-MNIST MLP-BN, 10 epochs) selected on held-out
images at batch 2048 from a factor-2 grid around the paper's scaling-rule value (``docs/recipes.md``);
warmup and decay lengths are the papers' fractions of their 90-epoch ImageNet runs applied to this
run's ``epochs`` (for example Goyal's 5 of 90 epochs of warmup). Factories and callbacks pickle, so
recipes also run under ``ddp_spawn``.

Example::

    r = recipes.build_recipe("goyal", global_batch_size=4096, epochs=10, steps_per_epoch=14)
    model = ClassifierModule("resnet", optimizer=r.optimizer)
    Trainer(max_epochs=10, callbacks=list(r.callbacks)).fit(model, datamodule=dm)

Sources, hyperparameters and the paper's numbers next to ours: ``docs/recipes.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_lbo._checks import positive_int
from lightning_lbo.compat import callback_bases

REFERENCE_BATCH = 256  # every paper states its LR for (or scales it from) batch 256
IMAGENET = 1281167  # training images of ImageNet-1k, the papers' data set
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
        paper_batch: ``(batch, training images, data set)``: the largest batch at which the paper kept
            small-batch accuracy (its batch / data-set ratio is where the recipe is known to work).
    """

    name: str
    source: str
    optimizer: Callable[[nn.Module], Any]
    callbacks: tuple[Any, ...] = ()
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    paper_batch: tuple[int, int, str] | None = None

    @property
    def paper_batch_fraction(self) -> float | None:
        """The paper's largest batch as a fraction of its training set (Goyal: 8192 / 1.28M = 0.64%)."""
        return None if self.paper_batch is None else self.paper_batch[0] / self.paper_batch[1]


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


@dataclass(frozen=True)
class LAMBFactory:
    """:class:`~lightning_lbo.optim.lamb.LAMB` with biases and norm layers out of the trust ratio and decay."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01

    def __call__(self, module: nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.optim.lamb import LAMB
        from lightning_lbo.param_groups import param_groups

        return LAMB(param_groups(module, self.weight_decay), lr=self.lr, betas=self.betas, eps=self.eps,
                    weight_decay=self.weight_decay)


@dataclass(frozen=True)
class RMSpropWarmupFactory:
    """:class:`~lightning_lbo.optim.rmsprop_warmup.RMSpropWarmup`; no decay on BN and biases."""

    lr: float
    lr_rmsprop: float = 3e-4
    momentum: float = 0.9
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 1e-4
    beta_center: float = 10.0
    beta_period: float = 5.0

    def __call__(self, module: nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup
        from lightning_lbo.param_groups import param_groups

        return RMSpropWarmup(param_groups(module, self.weight_decay), lr=self.lr, lr_rmsprop=self.lr_rmsprop,
                             momentum=self.momentum, alpha=self.alpha, eps=self.eps, beta_center=self.beta_center,
                             beta_period=self.beta_period)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class KFACFactory:
    """:class:`~lightning_lbo.optim.kfac.KFAC` bound to the LightningModule (hooks registered at build time).

    ``unit_wise_bn=False`` leaves BatchNorm to the plain momentum update (K-FAC 2018);
    ``stale_threshold`` turns on SP-NGD's adaptive refresh intervals.
    """

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = 1e-3
    fisher: str = "empirical"
    factor_decay: float = 0.05
    factor_update_interval: int = 1
    inverse_update_interval: int = 1
    kl_clip: float | None = 1e-3
    unit_wise_bn: bool = False
    stale_threshold: float | None = None
    stale_max_interval: int = 20
    momentum_correction: bool = False

    def __call__(self, module: nn.Module) -> torch.optim.Optimizer:
        from lightning_lbo.optim.kfac import KFAC, StaleStatistics

        stale = (StaleStatistics(threshold=self.stale_threshold, max_interval=self.stale_max_interval)
                 if self.stale_threshold is not None else None)
        return KFAC(module, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                    momentum_correction=self.momentum_correction, damping=self.damping, fisher=self.fisher,
                    factor_decay=self.factor_decay, factor_update_interval=self.factor_update_interval,
                    inverse_update_interval=self.inverse_update_interval, kl_clip=self.kl_clip,
                    stale_statistics=stale, exclude=() if self.unit_wise_bn else _BATCHNORMS)


@dataclass(frozen=True)
class ABSASGDFactory:
    """Momentum SGD with chainable schedulers (ABS rescales the LR when it doubles the batch).

    ``LinearLR`` warms up per optimizer step; ``MultiStepLR`` divides by 10 at whole epochs. Both
    multiply the current LR, so :class:`~lightning_lbo.callbacks.AdaptiveBatchSize`'s LR scaling stays.
    """

    lr: float
    warmup_steps: int
    warmup_start_factor: float
    milestones: tuple[int, ...]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True

    def __call__(self, module: nn.Module) -> Any:
        opt = SGDFactory(self.lr, self.momentum, self.weight_decay, self.nesterov, decay_norms=True)(module)
        schedulers = [{"scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, list(self.milestones), 0.1),
                       "interval": "epoch"}]
        if self.warmup_steps:
            schedulers.insert(0, {"scheduler": torch.optim.lr_scheduler.LinearLR(
                opt, self.warmup_start_factor, 1.0, total_iters=self.warmup_steps), "interval": "step"})
        return [opt], schedulers


@functools.cache
def _zero_gamma_init_class() -> type:
    """``ZeroGammaInit``, built at first use: its bases import Lightning, which ``import recipes`` does not."""

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

    ZeroGammaInit.__module__ = __name__  # pickle and LightningCLI's class_path find it through __getattr__
    ZeroGammaInit.__qualname__ = "ZeroGammaInit"
    return ZeroGammaInit


def __getattr__(name: str) -> Any:  # PEP 562: ``from lightning_lbo.recipes import ZeroGammaInit``
    if name == "ZeroGammaInit":
        return _zero_gamma_init_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fraction(epochs: float, paper_epochs: float) -> float:
    """``paper_epochs`` of a 90-epoch run, as epochs of a run of ``epochs``."""
    return epochs * paper_epochs / PAPER_EPOCHS


def momentum_sgd(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.05,
                 momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: float | None = None,
                 nesterov: bool = True) -> Recipe:
    """Tuned momentum-SGD baseline (Nado et al. 2021): Nesterov, linear scaling, warmup, cosine decay.

    Always shown next to the fancy methods: well-tuned Nesterov momentum matches LARS/LAMB at large
    batch more often than papers admit. LR ``base_lr * B / 256`` (study-tuned 0.05; Goyal's 0.1);
    linear warmup from 0 over 10% of the run (at most 2 epochs), then cosine to 0; weight decay on
    every parameter.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = min(2.0, 0.1 * epochs) if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="cosine",
                          reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "sgd", "Nado et al. 2021 (arXiv 2102.06356): tuned Nesterov momentum; Goyal et al. 2017 scaling rule",
        SGDFactory(base_lr, momentum, weight_decay, nesterov=nesterov, decay_norms=True), (schedule,),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum, nesterov=nesterov,
             weight_decay=weight_decay, warmup_epochs=round(warmup, 4), warmup_from=0.0, decay="cosine"),
        paper_batch=(32768, IMAGENET, "ImageNet"))


def goyal(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.05, momentum: float = 0.9,
          weight_decay: float = 1e-4, warmup_epochs: float | None = None, nesterov: bool = True) -> Recipe:
    """Goyal et al. 2017: momentum SGD, linear scaling, gradual warmup, zero-gamma, no decay on BN/biases.

    LR ``base_lr * B / 256`` (the paper's 0.1; study-tuned default 0.05); linear warmup from the
    unscaled LR (factor ``1/k``) over 5 of 90 epochs; LR / 10 at epochs 30, 60, 80 of 90 (scaled to
    the run); weight decay 1e-4 except BN and biases; Nesterov momentum 0.9 (LR outside the buffer,
    torch's form, so no momentum correction is needed); zero-init gamma of the last BN in each residual block.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = _fraction(epochs, 5) if warmup_epochs is None else warmup_epochs
    milestones = tuple(_fraction(epochs, e) for e in (30, 60, 80))
    schedule = LRSchedule(warmup_epochs=warmup, decay="step", milestones=milestones, gamma=0.1,
                          reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "goyal", "Goyal et al. 2017, Accurate, Large Minibatch SGD (arXiv 1706.02677)",
        SGDFactory(base_lr, momentum, weight_decay, nesterov=nesterov, decay_norms=False),
        (schedule, _zero_gamma_init_class()()),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum, nesterov=nesterov,
             weight_decay=weight_decay, no_decay="BN and biases", warmup_epochs=round(warmup, 4),
             warmup_from=REFERENCE_BATCH / global_batch_size,
             milestones_epochs=tuple(round(m, 4) for m in milestones), gamma=0.1,
             zero_gamma=True),
        paper_batch=(8192, IMAGENET, "ImageNet"))


def lars(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.2, momentum: float = 0.9,
         weight_decay: float = 5e-4, trust_coefficient: float = 0.02, warmup_epochs: float | None = None,
         power: float = 2.0) -> Recipe:
    """You, Gitman, Ginsburg 2017 (LARS): layer-wise trust ratio, warmup, poly(2) decay.

    Momentum 0.9 with the LR inside the buffer (the paper's form), weight decay 5e-4 inside the
    trust ratio; biases and BN excluded from trust ratio and decay (MLPerf); LR ``base_lr * B / 256``
    (study-tuned 0.2) after a linear warmup from 0 over 10% of the run (the paper warms up 2-12 of 90
    epochs; MLPerf 17 of 60), then ``(1 - t/T)^2``; momentum correction on LR changes.

    Trust coefficient: the paper's 0.001 pairs with LRs of ~29 at batch 32K, a peak relative weight
    step ``lr * eta`` of ~3% per iteration over thousands of iterations. Here non-adapted parameters
    (BN, biases) take the plain LR, so it stays near the SGD baseline's ``0.1 * B / 256`` and eta = 0.02
    gives the adapted layers the paper's ~3% relative step at batch 4096 (1.6 x 0.02); the study's
    held-out grid at batch 2048 is flat from base LR 0.05 to 0.4 (0.8930-0.8944) and peaks at 0.2.
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
             no_adapt_no_decay="BN and biases", warmup_epochs=round(warmup, 4), warmup_from=0.0,
             decay=f"poly({power:g})",
             momentum_correction=True),
        paper_batch=(32768, IMAGENET, "ImageNet"))


def lamb(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.01,
         weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
         warmup_epochs: float | None = None, power: float = 1.0) -> Recipe:
    """You et al. 2019 (LAMB): Adam moments with a layer-wise trust ratio, square-root LR scaling.

    LAMB (bias-corrected moments, betas 0.9/0.999, eps 1e-6, decoupled weight decay 0.01 inside the
    trust ratio; BN and biases excluded from ratio and decay); LR ``base_lr * sqrt(B / 256)`` (the
    paper's square-root scaling rule; study-tuned 0.01), linear warmup from 0 over 10% of the run, then
    poly(1) (linear) decay to 0, as in the paper's BERT runs.
    """
    from lightning_lbo.callbacks import LRSchedule

    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="poly", power=power, scaling="sqrt",
                          reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "lamb", "You et al. 2019, Large Batch Optimization for Deep Learning: Training BERT in 76 minutes "
                "(arXiv 1904.00962)",
        LAMBFactory(base_lr, tuple(betas), eps, weight_decay), (schedule,),
        dict(lr=base_lr * (global_batch_size / REFERENCE_BATCH) ** 0.5, base_lr=base_lr, scaling="sqrt",
             betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_adapt_no_decay="BN and biases",
             warmup_epochs=round(warmup, 4), warmup_from=0.0, decay=f"poly({power:g})"),
        paper_batch=(32768, IMAGENET, "ImageNet"))


def akiba(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.2, lr_rmsprop: float = 3e-4,
          momentum: float = 0.9, weight_decay: float = 1e-4) -> Recipe:
    """Akiba, Suzuki, Fukuda 2017: RMSprop warm-up, slow-start LR, BN without moving averages.

    RMSpropWarmup (lr_rmsprop 3e-4, mu1 0.9, mu2 0.99, eps 1e-8) moving to momentum SGD around
    epoch 10 of 90 over a period of 5 (scaled to the run: beta_center ``10/90``, beta_period ``5/90``
    of it); LR ``base_lr * B / 256`` (the paper's 0.1; study-tuned default 0.2) times Akiba's
    slow-start multipliers 0.5 / 0.075 / 0.01 / 0.001 at 40 / 70 / 85 of 90 epochs (scaled);
    evaluation with the BN statistics of the last training minibatch instead of running averages;
    weight decay 1e-4 except BN and biases.
    """
    from lightning_lbo.callbacks import BatchNormStats, LRSchedule
    from lightning_lbo.callbacks.fractional_epoch import FractionalEpoch

    center, period = _fraction(epochs, 10), _fraction(epochs, 5)
    schedule = LRSchedule(decay="slow_start", scale_slow_start=True, reference_batch_size=REFERENCE_BATCH)
    return Recipe(
        "akiba", "Akiba, Suzuki, Fukuda 2017, ResNet-50 on ImageNet in 15 Minutes (arXiv 1711.04325)",
        RMSpropWarmupFactory(base_lr, lr_rmsprop, momentum, weight_decay=weight_decay, beta_center=center,
                             beta_period=period),
        (schedule, FractionalEpoch(), BatchNormStats(mode="last_batches", num_batches=1)),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, lr_rmsprop=lr_rmsprop,
             momentum=momentum, alpha=0.99, eps=1e-8, weight_decay=weight_decay, no_decay="BN and biases",
             beta_center_epochs=round(center, 4), beta_period_epochs=round(period, 4),
             slow_start="0.5/0.075/0.01/0.001 at 40/70/85 of 90 epochs, scaled", bn_eval="last training batch"),
        paper_batch=(32768, IMAGENET, "ImageNet"))


def kfac(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.04, momentum: float = 0.9,
         weight_decay: float = 5e-4, damping: float = 1e-3, warmup_epochs: float | None = None,
         stale_threshold: float | None = None, factor_update_interval: int = 1,
         inverse_update_interval: int = 1) -> Recipe:
    """Osawa et al. 2018/2019 K-FAC: empirical Fisher, factor running average, fresh inverses, KL clip.

    Kronecker factors of every Linear/Conv2d refreshed every step into a running average (new
    statistic weight 0.05, i.e. the old factors keep 0.95) and
    inverted every step (Cholesky, factored Tikhonov damping 1e-3); BatchNorm keeps the plain
    momentum update; KL-clip 1e-3; momentum 0.9 without correction; weight decay 5e-4; LR
    ``base_lr * B / 256`` (study-tuned 0.04) after a linear warmup from 0 over 10% of the run, then
    poly(2) decay.
    ``stale_threshold`` adds SP-NGD's stale statistics (adaptive refresh intervals) to this recipe.
    ``factor_update_interval`` / ``inverse_update_interval`` amortise the refresh (the K-FAC class
    default is 10 and 10; benchmarks/time_to_target.py compares both schedules on time).
    """
    from lightning_lbo.callbacks import LRSchedule
    from lightning_lbo.callbacks.kfac import KFACCallback

    positive_int("factor_update_interval", factor_update_interval)
    positive_int("inverse_update_interval", inverse_update_interval)
    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="poly", power=2.0,
                          reference_batch_size=REFERENCE_BATCH)
    factory = KFACFactory(base_lr, momentum, weight_decay, damping, factor_update_interval=factor_update_interval,
                          inverse_update_interval=inverse_update_interval, stale_threshold=stale_threshold)
    return Recipe(
        "kfac", "Osawa et al. 2019, Large-Scale Distributed Second-Order Optimization Using K-FAC (arXiv 1811.12019)",
        factory, (schedule, KFACCallback(log_every_n_steps=0)),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum,
             weight_decay=weight_decay, damping=damping, fisher="empirical", factor_decay=factory.factor_decay,
             factor_update_interval=factor_update_interval, inverse_update_interval=inverse_update_interval,
             kl_clip=factory.kl_clip, batchnorm="plain SGD", warmup_epochs=round(warmup, 4), warmup_from=0.0,
             decay="poly(2)", stale_statistics="off" if stale_threshold is None else f"threshold {stale_threshold}"),
        paper_batch=(16384, IMAGENET, "ImageNet"))


def spngd(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.01, momentum: float = 0.9,
          weight_decay: float = 5e-4, damping: float = 1e-3, stale_threshold: float | None = 0.5,
          warmup_epochs: float | None = None, fisher: str = "mc", factor_decay: float = 1.0, power: float = 3.5,
          unit_wise_bn: bool = True) -> Recipe:
    """Osawa et al. 2020 SP-NGD: MC Fisher, stale statistics, unit-wise BN, momentum correction.

    One sampled label per example gives the output-gradient factor (MC "true" Fisher); fresh
    statistics (no running average, the large-batch setting); each statistic's refresh interval
    doubles while its relative change stays under 0.5 and halves otherwise (1 to 20 steps; the paper's
    0.1 is below the sampling noise of one-sample MC factors at batch 2048-8192, so it skipped only a
    third of the refreshes: study-tuned 0.5, 79-84% skipped at K-FAC's accuracy);
    BatchNorm preconditioned by its unit-wise 2x2 Fisher; momentum 0.9 with momentum correction;
    damping 1e-3; KL-clip 1e-3; LR ``base_lr * B / 256`` (study-tuned 0.01), warmup from 0 over 10% of
    the run, poly(3.5).
    ``fisher``, ``factor_decay``, ``power``, ``unit_wise_bn`` and ``stale_threshold=None`` switch single
    ingredients back to K-FAC's (the study's ablation of SP-NGD).
    """
    from lightning_lbo.callbacks import LRSchedule
    from lightning_lbo.callbacks.kfac import KFACCallback

    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    schedule = LRSchedule(warmup_epochs=warmup, warmup_start_factor=0.0, decay="poly", power=power,
                          reference_batch_size=REFERENCE_BATCH)
    factory = KFACFactory(base_lr, momentum, weight_decay, damping, fisher=fisher, factor_decay=factor_decay,
                          unit_wise_bn=unit_wise_bn, stale_threshold=stale_threshold, momentum_correction=True)
    stale = ("off" if stale_threshold is None
             else f"threshold {stale_threshold}, x2 / x0.5, 1-{factory.stale_max_interval} steps")
    return Recipe(
        "spngd", "Osawa et al. 2020, Scalable and Practical Natural Gradient (SP-NGD, arXiv 2002.06015)",
        factory, (schedule, KFACCallback(log_every_n_steps=0)),
        dict(lr=base_lr * global_batch_size / REFERENCE_BATCH, base_lr=base_lr, momentum=momentum,
             momentum_correction=True, weight_decay=weight_decay, damping=damping, fisher=fisher,
             factor_decay=factor_decay, stale_statistics=stale, kl_clip=factory.kl_clip,
             batchnorm="unit-wise" if unit_wise_bn else "plain SGD", warmup_epochs=round(warmup, 4),
             decay=f"poly({power:g})"),
        paper_batch=(131072, IMAGENET, "ImageNet"))


def absa(global_batch_size: int, epochs: int, steps_per_epoch: int, base_lr: float = 0.1, momentum: float = 0.9,
         weight_decay: float = 5e-4, max_accumulation: int = 4, adversarial_ratio: float = 0.2,
         epsilon: float = 0.005) -> Recipe:
    """Yao, Gholami, Keutzer, Mahoney 2018/2019 ABSA: Hessian-driven batch growth plus FGSM examples.

    Starts at ``global_batch_size``; after every epoch the Hessian's top eigenvalue (power iteration,
    10 iterations, tol 1e-2, one fixed batch, eval-mode BN) decides: when it halves, or after 10 of 90
    epochs (scaled, at least 1) without growth, the batch doubles through gradient accumulation (BN
    still sees the base batch) up to ``max_accumulation`` x, the LR doubles with it, and the
    adversarial ratio halves. 20% of each batch are FGSM examples (eps 0.005, data range clamped) until
    half of training. Nesterov momentum SGD, LR ``0.1 * B / 256`` with Goyal's warmup over 5/90 of the
    run and LR / 10 at 30/90, 60/90, 80/90 of it (whole epochs: torch's MultiStepLR).
    """
    from lightning_lbo.callbacks import AdaptiveBatchSize, AdversarialTraining

    k = global_batch_size / REFERENCE_BATCH
    warmup_steps = round(_fraction(epochs, 5) * steps_per_epoch)
    milestones = tuple(sorted({round(_fraction(epochs, e)) for e in (30, 60, 80)} - {0, epochs}))
    duration = max(1, round(_fraction(epochs, 10)))
    return Recipe(
        "absa", "Yao, Gholami, Keutzer, Mahoney 2018, Large batch size training ... (ABS/ABSA, arXiv 1810.01021)",
        ABSASGDFactory(base_lr * k, warmup_steps, min(1.0, 1.0 / k), milestones, momentum, weight_decay),
        (AdaptiveBatchSize(max_accumulation=max_accumulation, duration=duration),
         AdversarialTraining(ratio=adversarial_ratio, epsilon=epsilon, stop_fraction=0.5)),
        dict(lr=base_lr * k, base_lr=base_lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
             warmup_steps=warmup_steps, milestones_epochs=milestones, max_accumulation=max_accumulation,
             duration_epochs=duration, eigenvalue_ratio=0.5, adversarial_ratio=adversarial_ratio, epsilon=epsilon,
             adversarial_stop=0.5),
        paper_batch=(16384, IMAGENET, "ImageNet"))


RECIPES: dict[str, Callable[..., Recipe]] = {"sgd": momentum_sgd, "goyal": goyal, "lars": lars, "lamb": lamb,
                                             "akiba": akiba, "kfac": kfac, "spngd": spngd, "absa": absa}


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
