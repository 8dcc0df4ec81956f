"""Adaptive batch size from the Hessian's top eigenvalue (ABS; Yao, Gholami, Keutzer, Mahoney 2018).

After every training epoch the top eigenvalue ``lambda`` of the loss Hessian is measured on a fixed
batch (power iteration, eval-mode BN). With ``lambda_ref`` the value at the last increase (the first
measurement to begin with), the effective batch doubles when

* ``lambda <= eigenvalue_ratio * lambda_ref`` (the loss landscape got flatter; the paper halves), or
* ``duration`` epochs passed without an increase,

up to ``max_accumulation`` times the base batch; ``lambda_ref`` is then reset to ``lambda``. The batch
grows through ``trainer.accumulate_grad_batches`` (as Lightning's ``GradientAccumulationScheduler``
does), so every forward pass, and batch norm, still sees the base batch; the learning rate of every
param group is multiplied by the same factor (linear scaling). :class:`AdversarialTraining` halves its
adversarial ratio on each doubling when it finds this callback in the Trainer (ABSA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from lightning_lbo.callbacks.hessian_spectrum import FixedBatches
from lightning_lbo.compat import callback_bases, lightning_package, package_of
from lightning_lbo.hessian import HessianOperator, classifier_loss, power_iteration
from lightning_lbo.hessian.hvp import BN_MODES, LossFn

#: ``eigenvalue_fn(trainer, pl_module) -> float`` replaces the Hessian measurement (tests, other criteria).
EigenvalueFn = Callable[[Any, Any], float]
#: Param-group keys that hold a learning rate (torch schedulers keep "initial_lr"; OneCycleLR max/min).
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class AdaptiveBatchSize(*callback_bases()):
    """Double the effective batch (gradient accumulation) when the Hessian's top eigenvalue halves.

    Args:
        max_accumulation: largest accumulation factor (the maximum batch is this times the base batch).
        duration: epochs without an increase after which the batch doubles anyway (paper: 10).
        eigenvalue_ratio: double when the eigenvalue falls to this fraction of the reference (paper: 0.5).
        scale_lr: multiply every param group's LR (and schedulers' ``base_lrs``) by the same factor.
        power_iters: power-iteration steps at most (paper: ~10).
        tol: relative tolerance of the power iteration (paper: 1e-2).
        num_batches: fixed training batches per process the eigenvalue is measured on (paper: 1).
        bn_mode: batch-norm mode of the measurement (``"eval"``, the paper's, or ``"train"``).
        loss_fn: ``loss_fn(module, batch) -> mean loss`` (default: the ``(x, y)`` / ``loss_fn`` contract).
        eigenvalue_fn: replaces the measurement (``fn(trainer, pl_module) -> float``).
        checkpoint_batches: store the fixed batches in checkpoints, so a resumed run measures on the same
            data (costs their size; otherwise the first batches after resuming are used).
        seed: seed of the power iteration's start vector.

    Example::

        trainer = Trainer(max_epochs=90, callbacks=[AdaptiveBatchSize(max_accumulation=16, duration=10)])
    """

    def __init__(self, max_accumulation: int = 16, duration: int = 10, eigenvalue_ratio: float = 0.5,
                 scale_lr: bool = True, power_iters: int = 10, tol: float = 1e-2, num_batches: int = 1,
                 bn_mode: str = "eval", loss_fn: LossFn = classifier_loss, eigenvalue_fn: EigenvalueFn | None = None,
                 checkpoint_batches: bool = True, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("max_accumulation", max_accumulation), ("duration", duration),
                            ("power_iters", power_iters), ("num_batches", num_batches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; use a positive integer.")
        if not 0.0 < eigenvalue_ratio < 1.0:
            raise ValueError(f"Invalid eigenvalue_ratio: {eigenvalue_ratio}; use a value in (0, 1) (paper: 0.5).")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}; use a positive float.")
        if bn_mode not in BN_MODES:
            raise ValueError(f"Invalid bn_mode: {bn_mode!r}. Supported: {BN_MODES}.")
        if eigenvalue_fn is not None and not callable(eigenvalue_fn):
            raise TypeError(f"eigenvalue_fn must be callable (trainer, pl_module) -> float, got {eigenvalue_fn!r}.")
        self.max_accumulation, self.duration, self.eigenvalue_ratio = max_accumulation, duration, eigenvalue_ratio
        self.scale_lr, self.power_iters, self.tol, self.bn_mode = scale_lr, power_iters, tol, bn_mode
        self.loss_fn, self.eigenvalue_fn = loss_fn, eigenvalue_fn
        self.checkpoint_batches, self.seed = checkpoint_batches, seed
        self.fixed = FixedBatches(num_batches)
        self.accumulation = 1
        self.reference: float | None = None
        self.epochs_since_increase = 0
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(max_accumulation=self.max_accumulation, duration=self.duration)

    @property
    def at_maximum(self) -> bool:
        """True once the batch reached ``max_accumulation`` times the base batch."""
        return self.accumulation >= self.max_accumulation

    # ------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("AdaptiveBatchSize grows the batch through accumulate_grad_batches, which manual "
                               "optimization ignores: use automatic optimization or remove the callback.")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"AdaptiveBatchSize sets accumulate_grad_batches itself, but the Trainer was given "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches}: remove it (the base batch is "
                             "the DataLoader's batch size).")
        pkg = lightning_package(package_of(trainer))
        for cb in trainer.callbacks:
            if isinstance(cb, pkg.callbacks.GradientAccumulationScheduler):
                raise ValueError("AdaptiveBatchSize and GradientAccumulationScheduler both set "
                                 "accumulate_grad_batches: remove one of them.")
            if self.scale_lr and type(cb).__name__ == "LRSchedule":
                raise ValueError("LRSchedule sets every LR each step from the batch size at train start, which would "
                                 "undo AdaptiveBatchSize's LR scaling: use a torch scheduler in configure_optimizers, "
                                 "or AdaptiveBatchSize(scale_lr=False).")
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise RuntimeError("DeepSpeed fixes gradient accumulation at initialisation; AdaptiveBatchSize cannot "
                               "change it during training.")

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.accumulate_grad_batches = self.accumulation  # a resumed run continues at its batch size

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.accumulate_grad_batches = self.accumulation

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.fixed.offer(batch)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        eigenvalue = self.measure(trainer, pl_module)
        # Every rank measures the same all-reduced value; rank 0's decision is broadcast so no rank diverges.
        grow = trainer.strategy.broadcast(self.decide(eigenvalue))
        if grow:
            self._grow(trainer)
        self.history.append({"epoch": trainer.current_epoch, "eigenvalue": eigenvalue,
                             "accumulation": self.accumulation})
        pl_module.log("abs/eigenvalue", float(eigenvalue), on_epoch=True)
        pl_module.log("abs/accumulation", float(self.accumulation), on_epoch=True)

    def measure(self, trainer: Any, pl_module: Any) -> float:
        """The top Hessian eigenvalue on the fixed batches (or ``eigenvalue_fn``'s value)."""
        if self.eigenvalue_fn is not None:
            return float(self.eigenvalue_fn(trainer, pl_module))
        op = HessianOperator(pl_module, self.fixed.batches, loss_fn=self.loss_fn, bn_mode=self.bn_mode)
        result = power_iteration(op, k=1, max_iters=self.power_iters, tol=self.tol, seed=self.seed)
        op.release()
        return result.eigenvalues[0]

    def decide(self, eigenvalue: float) -> bool:
        """Update the reference and counter with this epoch's eigenvalue; True when the batch should double."""
        self.epochs_since_increase += 1
        if self.reference is None:
            self.reference = eigenvalue
            return False
        if self.at_maximum:
            return False
        if eigenvalue <= self.eigenvalue_ratio * self.reference or self.epochs_since_increase >= self.duration:
            self.reference = eigenvalue
            self.epochs_since_increase = 0
            return True
        return False

    def _grow(self, trainer: Any) -> None:
        new = min(2 * self.accumulation, self.max_accumulation)
        factor = new / self.accumulation
        self.accumulation = new
        trainer.accumulate_grad_batches = new
        if self.scale_lr:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    for key in LR_KEYS:
                        value = group.get(key)
                        if isinstance(value, torch.Tensor):  # tensor LRs (capturable optimizers): in place
                            value.mul_(factor)
                        elif isinstance(value, (int, float)):
                            group[key] = value * factor
            for config in trainer.lr_scheduler_configs:
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [lr * factor for lr in config.scheduler.base_lrs]

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"accumulation": self.accumulation, "reference": self.reference,
                 "epochs_since_increase": self.epochs_since_increase, "history": list(self.history)}
        if self.checkpoint_batches:
            state["fixed_batches"] = self.fixed.to_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accumulation = int(state_dict.get("accumulation", 1))
        self.reference = state_dict.get("reference")
        self.epochs_since_increase = int(state_dict.get("epochs_since_increase", 0))
        self.history = list(state_dict.get("history", []))
        self._loaded_batches = state_dict.get("fixed_batches")

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        loaded = getattr(self, "_loaded_batches", None)
        if loaded:
            self.fixed.load(loaded, pl_module.device)
            self._loaded_batches = None
