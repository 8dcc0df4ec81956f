"""KFACCallback: the Lightning side of K-FAC (binding, AMP scale, accumulation cycles, logging).

``KFAC(self, ...)`` built inside ``configure_optimizers`` works without this callback in fp32. The
callback is needed when

* the optimizer was built from parameters (LightningCLI: ``--optimizer KFAC``): it binds the hooks
  to the LightningModule when training starts (the ``ddp_kfac`` strategy does the same);
* training runs in ``16-mixed``: output gradients carry the grad scaler's scale, which the factors
  must not; and a step the scaler skips (inf/NaN gradients) must not leave its statistics behind;

and it logs what K-FAC is doing: damping, factor intervals, refresh counts, skipped refreshes,
inverse fallbacks and the KL-clip factor (``kfac/...`` keys).
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_lbo.compat import callback_bases
from lightning_lbo.optim.kfac.optimizer import KFAC
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner


def kfac_preconditioners(optimizers: list[Any]) -> list[tuple[Any, KFACPreconditioner]]:
    """``(optimizer, preconditioner)`` for every KFAC optimizer (or optimizer with a ``.preconditioner``)."""
    found = []
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer
        pre = getattr(opt, "preconditioner", None)
        if isinstance(pre, KFACPreconditioner):
            found.append((opt, pre))
    return found


class KFACCallback(*callback_bases()):
    """Bind K-FAC to the LightningModule, handle AMP and accumulation, and log K-FAC's state.

    Args:
        log_every_n_steps: log the ``kfac/*`` metrics every this many optimizer steps (0: never).

    Example::

        trainer = Trainer(precision="16-mixed", callbacks=[KFACCallback()])
        trainer.fit(ClassifierModule("cnn", optimizer=lambda m: KFAC(m, lr=0.1)))
    """

    def __init__(self, log_every_n_steps: int = 1) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps!r}; use a non-negative int.")
        self.log_every_n_steps = log_every_n_steps

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        found = kfac_preconditioners(trainer.optimizers)
        if not found:
            raise RuntimeError("KFACCallback found no KFAC optimizer: return lightning_lbo.KFAC(...) from "
                               "configure_optimizers or remove the callback.")
        plugin = getattr(trainer.strategy, "precision_plugin", None)
        scaler = getattr(plugin, "scaler", None)
        for opt, pre in found:
            if not pre.bound:
                if isinstance(opt, KFAC):
                    opt.bind(pl_module)
                else:
                    pre.bind(pl_module)
            pre.grad_scaler = scaler

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # First micro-batch of an accumulation cycle: drop statistics of a step the AMP scaler skipped.
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            for _, pre in kfac_preconditioners(trainer.optimizers):
                pre.discard_pending()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log_every_n_steps or trainer.global_step % self.log_every_n_steps:
            return
        for i, (opt, pre) in enumerate(kfac_preconditioners(trainer.optimizers)):
            prefix = "kfac/" if i == 0 else f"kfac_{i}/"
            intervals = [v for st in pre.states for v in st.interval.values()]
            metrics = {
                "damping": pre.current_damping(),
                "factor_interval_mean": sum(intervals) / len(intervals),
                "refreshes": float(sum(v for st in pre.states for v in st.refreshes.values())),
                "skipped_refreshes": pre.skipped_refreshes.float(),
                "inverse_fallbacks": float(pre.inverse_fallbacks),
            }
            if pre.last_kl_clip_factor is not None:
                metrics["kl_clip_factor"] = pre.last_kl_clip_factor
            if isinstance(opt, KFAC):
                metrics["skipped_steps"] = opt.skipped_steps.float()
            pl_module.log_dict({prefix + k: (v if isinstance(v, torch.Tensor) else torch.tensor(v))
                                for k, v in metrics.items()}, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"log_every_n_steps": self.log_every_n_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.log_every_n_steps = state_dict.get("log_every_n_steps", self.log_every_n_steps)
