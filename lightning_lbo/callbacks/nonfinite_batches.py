"""NonFiniteBatchGuard: a batch whose loss or gradients are not finite changes nothing, and is reported.

What a bad batch (NaN/Inf in the input, the loss or the gradients) would otherwise leave behind, and
what the guard does about it, all decided on the device (no host sync per step):

* **weights and optimizer state**: lightning_lbo's optimizers skip the whole step themselves
  (:mod:`lightning_lbo.optim._step_utils`); the guard adds "the loss was not finite" to their decision
  through ``skip_next_step_where``. Any other optimizer (``torch.optim.SGD``, ...) is protected by a copy
  of its parameters and state taken before its update and put back where the step was bad (one extra
  copy per step: the price of protecting an optimizer that cannot skip on the device);
* **normalization running statistics** (BatchNorm / InstanceNorm ``running_mean``, ``running_var``,
  ``num_batches_tracked``): the forward pass has already updated them; they are saved at the start of
  every accumulation cycle and restored when the cycle's step is skipped;
* **ranks**: gradients are all-reduced, so a NaN on one rank reaches every rank's decision; the
  loss flag is all-reduced too (one tiny collective per step), so all ranks skip together.

Under gradient accumulation the unit is the optimizer step: one bad micro-batch skips its whole
cycle, as if all of that cycle's micro-batches had been dropped. Under 16-bit AMP the grad scaler keeps
its own rule for overflowing *gradients* (it skips the step and lowers the scale); a non-finite *loss*
is a bad batch and restores the statistics as above (the scaler still lowers its scale).

Counters that live on the host keep counting attempted steps: Lightning's ``global_step``, LR
schedules, K-FAC's refresh intervals. The run with bad batches therefore equals the run without them
bit for bit when those do not depend on the step index (constant LR), and otherwise differs only by
that index shift. Counters that enter the math on the device (LAMB's bias-correction step, momentum)
count only the steps taken.

The count of skipped steps is read once per logging interval (``nonfinite_skips``); the first time it
is non-zero the guard warns once, on rank zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_lbo._dtensor import local_tensor, replicated_value
from lightning_lbo.compat import batch_norm_base, callback_bases
from lightning_lbo.optim._step_utils import all_finite

if TYPE_CHECKING:
    import pytorch_lightning as pl

try:  # rank_zero_warn lives in lightning_fabric (pytorch_lightning's dependency)
    from lightning_fabric.utilities.rank_zero import rank_zero_warn
except ImportError:  # pragma: no cover - lightning.pytorch-only installs
    from lightning.fabric.utilities.rank_zero import rank_zero_warn

METRIC = "nonfinite_skips"


def running_statistics(module: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalization layer that tracks them."""
    return [buf for m in module.modules() if isinstance(m, batch_norm_base()) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


def skips_on_device(optimizer: Any) -> bool:
    """True for optimizers that follow lightning_lbo's skip contract (count and skip on the device)."""
    return hasattr(optimizer, "nonfinite_skips") and hasattr(optimizer, "skip_next_step_where")


class TensorSnapshot:
    """A saved copy of a fixed list of tensors, put back on the device where a 0-d bool says so.

    Tensors are kept per (device, dtype) in one flat buffer, so saving and restoring cost three ops per
    group, not one per tensor. A sharded tensor (DTensor: parameters and optimizer state under
    ``fully_shard``) is saved and restored through its local shard: each rank keeps only what it holds.
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.ids = [id(t) for t in tensors]
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self._groups = list(groups.values())
        self._saved = [torch.empty(sum(local_tensor(t).numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device)
                       for ts in self._groups]

    @staticmethod
    def _locals(ts: list[Tensor]) -> list[Tensor]:
        # re-read every time: the shard is a view of the DTensor's storage, never cached across steps
        return [local_tensor(t.detach()) for t in ts]

    def save(self) -> None:
        for ts, flat in zip(self._groups, self._saved, strict=True):
            torch.cat([t.reshape(-1) for t in self._locals(ts)], out=flat)

    def restore_where(self, restore: Tensor) -> None:
        """``t = saved if restore else t`` for every tensor (``restore``: 0-d bool on any device)."""
        for ts, flat in zip(self._groups, self._saved, strict=True):
            shards = self._locals(ts)
            current = torch.cat([t.reshape(-1) for t in shards])
            merged = torch.where(restore.to(flat.device), flat, current)
            torch._foreach_copy_(shards, [part.view_as(t) for part, t in
                                          zip(merged.split([t.numel() for t in shards]), shards, strict=True)])


def _grad_scaler(trainer: pl.Trainer) -> Any:
    """The AMP grad scaler of a 16-mixed Trainer, or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


class OptimizerUndo:
    """Puts an optimizer that cannot skip on the device (any ``torch.optim`` one) back to before its step.

    :meth:`save` before the update copies the parameters and every state tensor; :meth:`restore_where`
    after it puts them back where ``bad`` is True, on the device. State tensors the step *replaced*
    (``state["step"] = step + 1``) are copied into the saved objects first, so both kinds restore alike.
    State the step *created* (SGD's momentum buffer at the first step) has nothing to go back to: whether
    to delete it is a host decision, made by reading ``bad`` only on a step that created state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._snapshot: TensorSnapshot | None = None
        self._entries: list[tuple[Tensor, str, Tensor]] = []

    def _state_entries(self) -> list[tuple[Tensor, str, Tensor]]:
        return [(p, key, v) for g in self.optimizer.param_groups for p in g["params"]
                for key, v in self.optimizer.state.get(p, {}).items() if isinstance(v, Tensor)]

    def save(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._entries = self._state_entries()
        tensors = params + [v for _, _, v in self._entries]
        if self._snapshot is None or self._snapshot.ids != [id(t) for t in tensors]:
            self._snapshot = TensorSnapshot(tensors)  # first step, or state was created: new buffers
        self._snapshot.save()

    def restore_where(self, bad: Tensor) -> None:
        state = self.optimizer.state
        known = {(id(p), key) for p, key, _ in self._entries}
        for p, key, saved in self._entries:
            current = state[p].get(key)
            if current is not saved and isinstance(current, Tensor) and current.shape == saved.shape:
                saved.copy_(current)  # replaced by the step: carry its value into the saved object
                state[p][key] = saved
        created = [(p, key) for p, key, _ in self._state_entries() if (id(p), key) not in known]
        if created and bool(bad.item()):
            for p, key in created:
                del state[p][key]
                if not state[p]:
                    del state[p]
        assert self._snapshot is not None
        self._snapshot.restore_where(bad)


class NonFiniteBatchGuard(*callback_bases()):
    """Skip every optimizer step whose batch is not finite, leaving all training state as it was; log the count.

    Args:
        log_every_n_steps: read and log the count every this many optimizer steps (default: the
            Trainer's ``log_every_n_steps``).

    Callbacks that record training batches (``BatchNormStats``' window) take part through one method,
    ``discard_cycle_where(bad)``: called at the end of every accumulation cycle with a 0-d bool device tensor,
    it forgets what was recorded in that cycle where ``bad`` is true, without a host sync.

    Example::

        Trainer(callbacks=[NonFiniteBatchGuard()])   # any optimizer; LARS/LAMB/RMSpropWarmup skip for free
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool)
                                              or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps!r}; use a positive int or None.")
        self.log_every_n_steps = log_every_n_steps
        self.warned = False
        self.total = 0  # skipped steps at the last read
        self._count: Tensor | None = None  # skipped steps, on the device
        self._loaded_total = 0
        self._statistics: TensorSnapshot | None = None
        self._cycle_open = False
        self._bad: Tensor | None = None  # this cycle's loss was not finite (on the device)
        self._pending: list[tuple[Any, Any]] = []  # optimizers stepped in this batch, with what undoes them
        self._foreign: dict[int, OptimizerUndo] = {}
        self._scaler_undo: tuple[Any, Tensor, Tensor] | None = None
        self._read_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("NonFiniteBatchGuard works with automatic optimization; with manual optimization "
                               "check the loss before calling optimizer.step(), or remove the callback.")
        device = pl_module.device
        self._count = torch.tensor(self._loaded_total, dtype=torch.int64, device=device)
        stats = running_statistics(pl_module)
        self._statistics = TensorSnapshot(stats) if stats else None
        self._foreign = {}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._cycle_open:
            return
        self._cycle_open = True
        self._bad = torch.zeros((), dtype=torch.bool, device=pl_module.device)
        if self._statistics is not None:
            self._statistics.save()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._bad is not None:
            self._bad = self._bad | ~torch.isfinite(loss.detach()).all()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer
        bad = self._bad if self._bad is not None else torch.zeros((), dtype=torch.bool, device=pl_module.device)
        if trainer.world_size > 1:  # every rank must take the same decision
            bad = trainer.strategy.reduce(bad.to(torch.float32), reduce_op="sum") > 0
        scaler = _grad_scaler(trainer)
        if scaler is not None:  # its scale as a device tensor (public API, no sync), to undo its backoff
            self._scaler_undo = (scaler, bad, scaler.scale(torch.ones((), device=pl_module.device)))
        if skips_on_device(opt):
            opt.skip_next_step_where(bad)
            self._pending.append((opt, (bad, opt.nonfinite_skips.clone())))
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads and scaler is None:  # under a grad scaler, overflowing gradients are the scaler's (it skips)
            # Sharded gradients (DTensors): the check covers every rank's shard, read out as one plain flag, so
            # a NaN in another rank's rows skips this rank's update too.
            bad = bad | ~replicated_value(all_finite(grads, device=bad.device))
        if id(opt) not in self._foreign:
            self._foreign[id(opt)] = OptimizerUndo(opt)
        undo = self._foreign[id(opt)]
        undo.save()
        self._pending.append((opt, (bad, undo)))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._pending:  # accumulating: the cycle goes on
            return
        skipped = torch.zeros((), dtype=torch.bool, device=pl_module.device)
        for opt, (bad, undo) in self._pending:
            if isinstance(undo, OptimizerUndo):
                undo.restore_where(bad)
            else:  # the optimizer skipped on its own (non-finite gradients) or on our request
                opt.skip_next_step_where(None)  # withdraw a request an AMP-skipped step did not consume
                bad = bad | (opt.nonfinite_skips != undo).to(bad.device)
            skipped = skipped | bad.to(skipped.device)
        self._pending = []
        self._cycle_open = False
        if self._scaler_undo is not None:  # a non-finite loss is a bad batch, not an overflow: keep the scale
            scaler, loss_bad, scale_before = self._scaler_undo
            scaler.update(torch.where(loss_bad, scale_before, scaler.scale(torch.ones_like(scale_before))))
            self._scaler_undo = None
        if self._statistics is not None:
            self._statistics.restore_where(skipped)
        for callback in trainer.callbacks:  # callbacks that record training batches forget the skipped ones
            if callback is not self and hasattr(callback, "discard_cycle_where"):
                callback.discard_cycle_where(skipped)
        assert self._count is not None
        self._count += skipped.to(self._count.device, torch.int64)
        self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every != 0 or trainer.global_step == self._read_step:
            return
        self._read_step = trainer.global_step
        assert self._count is not None
        self.total = int(self._count.item())  # the one host sync, once per logging interval
        pl_module.log(METRIC, float(self.total), on_step=True, on_epoch=False)
        if self.total > 0 and not self.warned:
            self.warned = True
            rank_zero_warn(f"{self.total} optimizer step(s) were skipped so far because the loss or the gradients "
                           "were not finite (NaN/Inf); weights, optimizer state and normalization statistics were "
                           "left as they were. Check the data for NaN/Inf, lower the LR, or enable gradient "
                           "clipping; the count is logged as 'nonfinite_skips'.")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count is not None:
            self.total = int(self._count.item())

    @override
    def state_dict(self) -> dict[str, Any]:
        total = int(self._count.item()) if self._count is not None else self._loaded_total
        return {"warned": self.warned, "skipped_steps": total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = state_dict.get("warned", False)
        self._loaded_total = self.total = int(state_dict.get("skipped_steps", 0))
        if self._count is not None:
            self._count.fill_(self._loaded_total)
