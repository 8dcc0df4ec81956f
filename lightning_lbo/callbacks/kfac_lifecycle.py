"""The Lightning lifecycle of K-FAC, in one place: find, bind, grad scaler, communicator, logging, teardown.

:class:`KFACLifecycle` holds the hooks; :class:`~lightning_lbo.callbacks.kfac.KFACCallback` is the
public callback built on it, and every Trainer has one: installing lightning_lbo registers
:func:`callbacks_factory_pytorch_lightning` / :func:`callbacks_factory_lightning` under Lightning's
``callbacks_factory`` entry points, so a Trainer built without a ``KFACCallback`` gets a silent one
(no logging, nothing to do without a K-FAC optimizer; built on that Trainer's package only, so the
other package is not imported) that steps aside when the user passes their own. At ``on_fit_start`` (after the
strategy's setup, before the checkpoint's optimizer state is restored) it calls :func:`attach_kfac`, the
one path that connects K-FAC to a run; the ``ddp_kfac`` strategy only builds the communicator it
injects. :func:`attach_kfac`

1. finds every K-FAC preconditioner: the ``preconditioner`` of an optimizer (Lightning wrappers
   unwrapped) or a standalone ``KFACPreconditioner`` stored on the LightningModule;
2. binds those built from parameters alone (LightningCLI: ``--optimizer KFAC``) to the LightningModule;
3. gives them the precision plugin's AMP grad scaler (16-mixed: output gradients carry its scale,
   which the factors must not);
4. injects the communicator: the strategy's (``ddp_kfac``) or, under another multi-process strategy
   (plain ``ddp``), a synchronous one; a single process keeps the no-op communicator;
5. checks that every rank built the same K-FAC layers and settings (fails instead of hanging).

:func:`detach_kfac` removes the capture hooks at the end of the run (``on_fit_end``, or
``on_exception``). The callback also drops the statistics of a step the AMP scaler skipped and logs
what K-FAC is doing (``kfac/...`` keys, with an explicit ``KFACCallback``). Outside Lightning, a
multi-process user injects the communicator: ``pre.set_communicator(default_communicator())``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_lbo.compat import lightning_package, per_package, publish_per_package
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner


def find_kfac(optimizers: Sequence[Any], module: Any = None) -> list[tuple[Any, KFACPreconditioner]]:
    """``(optimizer or None, preconditioner)`` for every K-FAC preconditioner, each once.

    The ``preconditioner`` of an optimizer (``LightningOptimizer`` unwrapped), or a standalone one
    stored as an attribute of ``module`` (``self.kfac = KFACPreconditioner(self)``).
    """
    found: dict[int, tuple[Any, KFACPreconditioner]] = {}
    for optimizer in optimizers:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
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
                signature_extra: dict[str, Any] | None = None) -> list[tuple[Any, KFACPreconditioner]]:
    """Bind, scale, connect and verify every K-FAC instance of a run (all ranks call it); idempotent.

    Args:
        optimizers: the Trainer's optimizers.
        module: the LightningModule.
        precision_plugin: the strategy's precision plugin (its ``scaler``, if any, is given to K-FAC).
        communicator: the communicator to inject (``ddp_kfac``); ``None``: a synchronous one when a
            multi-process group is initialised and none was injected yet, else nothing.
        signature_extra: more settings every rank must share (the strategy's knobs).

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
            pre.set_communicator(default_communicator())
    return found


def detach_kfac(optimizers: Sequence[Any], module: Any = None) -> None:
    """Remove the capture hooks of every K-FAC instance (teardown: a later run builds its own)."""
    for _, pre in find_kfac(optimizers, module):
        pre.remove_hooks()


class KFACLifecycle:
    """The hooks of :class:`~lightning_lbo.callbacks.kfac.KFACCallback`: attach K-FAC to the run
    (:func:`attach_kfac`), drop statistics of AMP-skipped steps, log K-FAC's state, detach at the end.

    A mixin without a Lightning base: the public callback adds every installed package's ``Callback``,
    the automatic one only its Trainer's.
    """

    _automatic = False  # True for the instance a Trainer gets from the entry point

    def __init__(self, log_every_n_steps: int = 1) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps!r}; use a non-negative int.")
        self.log_every_n_steps = log_every_n_steps

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        found = attach_kfac(trainer.optimizers, pl_module, getattr(strategy, "precision_plugin", None),
                            getattr(strategy, "communicator", None), getattr(strategy, "curvature_settings", None))
        if not found and not self._automatic:
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
            metrics = {
                "damping": pre.current_damping(),
                "factor_interval_mean": sum(intervals) / len(intervals),
                "refreshes": float(sum(v for block in pre.blocks for v in block.refreshes.values())),
                "skipped_refreshes": pre.skipped_refreshes.float(),
                "inverse_fallbacks": float(pre.inverse_fallbacks),
            }
            if pre.last_kl_clip_factor is not None:
                metrics["kl_clip_factor"] = pre.last_kl_clip_factor
            skips = getattr(opt, "nonfinite_skips", None)
            if isinstance(skips, torch.Tensor):
                metrics["nonfinite_skips"] = skips.float()
            pl_module.log_dict({prefix + k: (v if isinstance(v, torch.Tensor) else torch.tensor(v))
                                for k, v in metrics.items()}, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"log_every_n_steps": self.log_every_n_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.log_every_n_steps = state_dict.get("log_every_n_steps", self.log_every_n_steps)


@per_package
def automatic_kfac_callback_class(package: str) -> type:
    """The ``KFACCallback`` of a Trainer built without one, on ``package``'s ``Callback`` only.

    It attaches K-FAC like an explicit one but logs nothing, says nothing when the run has no K-FAC
    optimizer, keeps no state, and at ``setup`` leaves the Trainer's callbacks when the user passed a
    ``KFACCallback`` (or returned one from ``configure_callbacks``), so a run has exactly one.
    """

    class AutomaticKFACCallback(KFACLifecycle, lightning_package(package).Callback):
        _automatic = True

        def __init__(self) -> None:
            super().__init__(log_every_n_steps=0)

        @property
        def state_key(self) -> str:
            return self._generate_state_key(automatic=True)  # never collides with a user's KFACCallback

        @override
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if any(isinstance(c, KFACLifecycle) and not c._automatic for c in trainer.callbacks):
                # A new list (Lightning iterates the old one while calling this hook), as configure_callbacks does.
                trainer.callbacks = [c for c in trainer.callbacks if c is not self]

        @override
        def state_dict(self) -> dict[str, Any]:
            return {}

        @override
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    return publish_per_package(AutomaticKFACCallback, __name__, package)


def callbacks_factory_pytorch_lightning() -> list[Any]:
    """The ``pytorch_lightning.callbacks_factory`` entry point (pyproject.toml): every Trainer gets a
    ``KFACCallback`` that owns K-FAC's lifecycle (inert without a K-FAC optimizer)."""
    return [automatic_kfac_callback_class("pytorch_lightning")()]


def callbacks_factory_lightning() -> list[Any]:
    """The ``lightning.pytorch.callbacks_factory`` entry point (see :func:`callbacks_factory_pytorch_lightning`)."""
    return [automatic_kfac_callback_class("lightning.pytorch")()]


def __getattr__(name: str) -> type:
    # Unpickling the automatic callback in a ddp_spawn worker asks for its class by its published name.
    for package in ("pytorch_lightning", "lightning.pytorch"):
        suffix = "" if package == "pytorch_lightning" else "_" + package.replace(".", "_")
        if name == "AutomaticKFACCallback" + suffix:
            return automatic_kfac_callback_class(package)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
