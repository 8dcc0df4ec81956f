"""Log and warn (once) about tensor updates LARS / LAMB / RMSpropWarmup skipped for non-finite gradients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_lbo.compat import callback_bases

if TYPE_CHECKING:
    import pytorch_lightning as pl

try:  # rank_zero_warn lives in lightning_fabric (pytorch_lightning's dependency)
    from lightning_fabric.utilities.rank_zero import rank_zero_warn
except ImportError:  # pragma: no cover - lightning.pytorch-only installs
    from lightning.fabric.utilities.rank_zero import rank_zero_warn


class NonFiniteSkipMonitor(*callback_bases()):
    """Reads the optimizers' skip counters every ``log_every_n_steps`` steps, logs them, warns once.

    The optimizers count skips on the device without a host sync; this callback pays one sync per
    logging interval (when Lightning syncs for logging anyway) to publish ``nonfinite_skips`` and to
    warn the first time a skip happened, naming the parameters.

    Args:
        log_every_n_steps: read interval in optimizer steps (default: the Trainer's ``log_every_n_steps``).

    Example::

        Trainer(callbacks=[NonFiniteSkipMonitor()])   # with LARS / LAMB / RMSpropWarmup from configure_optimizers
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps!r}; use a positive int or None.")
        self.log_every_n_steps = log_every_n_steps
        self.warned = False
        self.total = 0
        self._read_step = -1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        # Under gradient accumulation several micro-batches end at the same global_step: read once per step.
        if trainer.global_step == 0 or trainer.global_step % every != 0 or trainer.global_step == self._read_step:
            return
        self._read_step = trainer.global_step
        optimizers = [opt for opt in trainer.optimizers if hasattr(opt, "nonfinite_skips")]
        if not optimizers:
            return
        self.total = int(sum(opt.nonfinite_skips().item() for opt in optimizers))
        pl_module.log("nonfinite_skips", float(self.total), on_step=True, on_epoch=False)
        if self.total > 0 and not self.warned:
            self.warned = True
            names = {id(p): n for n, p in pl_module.named_parameters()}
            skipped = [names.get(id(p), f"<{tuple(p.shape)}>") for opt in optimizers for p, s in opt.state.items()
                       if "nonfinite_skips" in s and s["nonfinite_skips"].item() > 0]
            rank_zero_warn(f"{self.total} parameter update(s) were skipped for non-finite gradients so far "
                           f"(parameters: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}). "
                           "Lower the LR, enable gradient clipping or check the loss for overflow.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": self.warned, "total": self.total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = state_dict.get("warned", False)
        self.total = state_dict.get("total", 0)
