"""The Lightning lifecycle of K-FAC, in one place: find, bind, grad scaler, communicator, logging, teardown.

:class:`KFACLifecycle` holds the hooks; :class:`~lightning_lbo.callbacks.kfac.KFACCallback` is the
public callback built on it. A run gets one only when it asks for K-FAC: the user passes
``callbacks=[KFACCallback()]``, or ``strategy="ddp_kfac"`` adds a silent one (no logging, a warning
instead of an error without a K-FAC optimizer) when the user passed none. A Trainer that does neither
gets nothing from this package: no callback, no import of the K-FAC core, no console line.

At ``on_fit_start`` (after the strategy's setup, before the checkpoint's optimizer state is restored)
the callback calls :func:`attach_kfac`, the one path that connects K-FAC to a run; the ``ddp_kfac``
strategy only builds the communicator it injects. :func:`attach_kfac`

1. finds every K-FAC preconditioner: the ``preconditioner`` of an optimizer (Lightning wrappers
   unwrapped) or a standalone ``KFACPreconditioner`` stored on the LightningModule;
2. binds those built from parameters alone (LightningCLI: ``--optimizer KFAC``) to the LightningModule;
3. gives them the precision plugin's AMP grad scaler (16-mixed: output gradients carry its scale,
   which the factors must not);
4. injects the communicator: the strategy's (``ddp_kfac``) or, under another multi-process strategy
   (plain ``ddp``), a synchronous one on a group with the strategy's timeout; a single process keeps
   the no-op communicator;
5. checks that every rank built the same K-FAC layers and settings (fails instead of hanging).

Without the callback, K-FAC checks at its first step what only this wiring provides
(:func:`lightning_lbo.optim.kfac.binding.check_bound`: several ranks, an AMP scale) and fails with a
message naming ``KFACCallback()``. :func:`detach_kfac` removes the capture hooks at the end of the run
(``on_fit_end``, or ``on_exception``). The callback also drops the statistics of a step the AMP scaler
skipped and logs what K-FAC is doing (``kfac/...`` keys, built on the device: no host-to-device copy).
Outside Lightning, a multi-process user injects the communicator: ``pre.set_communicator(default_communicator())``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from lightning_lbo.compat import strategy_timeout, unwrap_optimizer

if TYPE_CHECKING:
    from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner


def find_kfac(optimizers: Sequence[Any], module: Any = None) -> list[tuple[Any, KFACPreconditioner]]:
    """``(optimizer or None, preconditioner)`` for every K-FAC preconditioner, each once.

    The ``preconditioner`` of an optimizer (``LightningOptimizer`` unwrapped), or a standalone one
    stored as an attribute of ``module`` (``self.kfac = KFACPreconditioner(self)``).
    """
    # Imported here: this module is loaded by Lightning for stale entry points, which must not import the core.
    from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner

    found: dict[int, tuple[Any, KFACPreconditioner]] = {}
    for optimizer in optimizers:
        optimizer = unwrap_optimizer(optimizer)
        pre = getattr(optimizer, "preconditioner", None)
        if isinstance(pre, KFACPreconditioner):
            found.setdefault(id(pre), (optimizer, pre))
    for value in (vars(module).values() if module is not None else ()):
        if isinstance(value, KFACPreconditioner):
            found.setdefault(id(value), (None, value))
    return list(found.values())


def _describe(value: Any) -> Any:
    """A rank-independent, picklable description of a setting (callables by name, enums by value)."""
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__qualname__", type(value).__qualname__)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return getattr(value, "value", None) if hasattr(value, "value") else repr(value)


def kfac_signature(optimizer: Any, preconditioner: KFACPreconditioner) -> dict[str, Any]:
    """Layers (name, block type, factor sizes) and settings of one K-FAC instance, compared across ranks."""
    signature = preconditioner.signature()  # layers and every setting, derived from the settings objects
    if optimizer is not None:
        signature["settings"] |= {f"optimizer.{k}": _describe(v)
                                  for k, v in sorted(getattr(optimizer, "defaults", {}).items())}
    return signature


def attach_kfac(optimizers: Sequence[Any], module: Any, precision_plugin: Any = None, communicator: Any = None,
                signature_extra: dict[str, Any] | None = None, timeout: Any = None
                ) -> list[tuple[Any, KFACPreconditioner]]:
    """Bind, scale, connect and verify every K-FAC instance of a run (all ranks call it); idempotent.

    Args:
        optimizers: the Trainer's optimizers.
        module: the LightningModule.
        precision_plugin: the strategy's precision plugin (its ``scaler``, if any, is given to K-FAC).
        communicator: the communicator to inject (``ddp_kfac``); ``None``: a synchronous one when a
            multi-process group is initialised and none was injected yet, else nothing.
        signature_extra: more settings every rank must share (the strategy's knobs).
        timeout: the ``datetime.timedelta`` of the synchronous communicator's process group (the strategy's
            collective timeout); ``None``: torch's default.

    Returns the ``(optimizer, preconditioner)`` pairs found.
    """
    import torch.distributed as dist

    found = find_kfac(optimizers, module)
    scaler = getattr(precision_plugin, "scaler", None)
    for optimizer, pre in found:
        if not pre.bound:
            (optimizer if callable(getattr(optimizer, "bind", None)) else pre).bind(module)
        pre.grad_scaler = scaler
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return found
    from lightning_lbo.optim.kfac.distributed import default_communicator, verify_same_signature

    signature = {"strategy": signature_extra or {}, "kfac": [kfac_signature(opt, pre) for opt, pre in found]}
    verify_same_signature(signature)
    for _, pre in found:
        if communicator is not None:
            pre.set_communicator(communicator)
        elif not pre.comm.is_distributed:
            pre.set_communicator(default_communicator(timeout=timeout))
    return found


def detach_kfac(optimizers: Sequence[Any], module: Any = None) -> None:
    """Remove the capture hooks of every K-FAC instance (teardown: a later run builds its own)."""
    for _, pre in find_kfac(optimizers, module):
        pre.remove_hooks()


class KFACLifecycle:
    """The hooks of :class:`~lightning_lbo.callbacks.kfac.KFACCallback`: attach K-FAC to the run
    (:func:`attach_kfac`), drop statistics of AMP-skipped steps, log K-FAC's state, detach at the end.

    A mixin without a Lightning base (the public callback adds every installed package's ``Callback``).

    Args:
        log_every_n_steps: log the ``kfac/*`` metrics every this many optimizer steps (0: never). Every
            metric is a device tensor (``torch.full`` on the module's device): logging copies nothing
            from the host and waits for nothing.
        require_kfac: raise at ``on_fit_start`` when the run has no K-FAC optimizer (the user asked for
            K-FAC); the instance ``strategy="ddp_kfac"`` adds passes ``False`` (the strategy warns instead).
    """

    def __init__(self, log_every_n_steps: int = 1, *, require_kfac: bool = True) -> None:
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 0:
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps!r}; use a non-negative int.")
        self.log_every_n_steps = log_every_n_steps
        self.require_kfac = require_kfac

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        found = attach_kfac(trainer.optimizers, pl_module, getattr(strategy, "precision_plugin", None),
                            getattr(strategy, "communicator", None), getattr(strategy, "curvature_settings", None),
                            timeout=strategy_timeout(strategy))
        if not found and self.require_kfac:
            raise RuntimeError("KFACCallback found no KFAC optimizer: return lightning_lbo.KFAC(...) from "
                               "configure_optimizers or remove the callback.")

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        detach_kfac(trainer.optimizers, pl_module)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        detach_kfac(trainer.optimizers, pl_module)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # First micro-batch of an accumulation cycle: drop statistics of a step the AMP scaler skipped.
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            for _, pre in find_kfac(trainer.optimizers, pl_module):
                pre.discard_pending()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log_every_n_steps or trainer.global_step % self.log_every_n_steps:
            return
        for i, (opt, pre) in enumerate(find_kfac(trainer.optimizers, pl_module)):
            prefix = "kfac/" if i == 0 else f"kfac_{i}/"
            intervals = [v for block in pre.blocks for v in block.interval.values()]
            # Host numbers become device tensors through a fill (no host-to-device copy, no sync, unlike
            # torch.tensor(x) or a float given to log); the counters K-FAC keeps on the device are logged as they are.
            device = pre.skipped_refreshes.device
            host = {
                "damping": pre.current_damping(),
                "factor_interval_mean": sum(intervals) / max(1, len(intervals)),
                "refreshes": sum(v for block in pre.blocks for v in block.refreshes.values()),
                "inverse_fallbacks": pre.inverse_fallbacks,
            }
            metrics = {name: torch.full((), float(value), device=device) for name, value in host.items()}
            metrics["skipped_refreshes"] = pre.skipped_refreshes.float()
            if isinstance(pre.last_kl_clip_factor, torch.Tensor):
                metrics["kl_clip_factor"] = pre.last_kl_clip_factor.float()
            skips = getattr(opt, "nonfinite_skips", None)
            if isinstance(skips, torch.Tensor):
                metrics["nonfinite_skips"] = skips.float()
            pl_module.log_dict({prefix + k: v for k, v in metrics.items()}, on_step=True, on_epoch=False)

    # Logging cadence is configuration, not training state: nothing to checkpoint (a resumed run keeps the
    # cadence it was built with; an instance ``ddp_kfac`` added never overrides the user's).
    @override
    def state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


# Lightning's ``callbacks_factory`` entry points that older versions declared: the metadata of an environment
# installed before this change still names them until ``pip install -e .`` runs again. They add nothing.
def callbacks_factory_pytorch_lightning() -> list[Any]:
    """Removed entry point (a Trainer gets no K-FAC callback it was not given); kept so that stale installed
    metadata naming it still loads. Returns no callback."""
    return []


def callbacks_factory_lightning() -> list[Any]:
    """Removed entry point, see :func:`callbacks_factory_pytorch_lightning`. Returns no callback."""
    return []
