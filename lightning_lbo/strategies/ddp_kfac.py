"""``ddp_kfac``: Lightning's DDP strategy plus K-FAC curvature sync (KAISA-style), for both Lightning packages.

DDP averages gradients; :class:`KFACDDPStrategy` makes K-FAC's *curvature* distributed too. It provides
the process group, the communicator and the flush; attaching K-FAC to the run (bind, grad scaler,
communicator injection, cross-rank check, teardown) is
:class:`~lightning_lbo.callbacks.kfac.KFACCallback`'s: the strategy adds a silent one (no logging) when
the user passed none, so ``strategy="ddp_kfac"`` alone is a complete K-FAC setup. It

1. checks ``grad_worker_fraction`` at construction (and against the world size at setup) with one rule
   (:func:`~lightning_lbo.optim.kfac.distributed.check_grad_worker_fraction`);
2. after the optimizers are set up, builds a
   :class:`~lightning_lbo.optim.kfac.distributed.TorchDistributedCommunicator` on a dedicated process
   group created with the strategy's ``timeout`` (a frozen peer makes a curvature collective fail after
   ``timeout`` like a DDP collective, instead of hanging) (:attr:`communicator`, with
   :attr:`curvature_settings`, the knobs every rank must share): factors are all-reduced asynchronously
   in buckets as packed triangles, inverse work is assigned by greedy LPT on ``n^3``, and
   ``grad_worker_fraction`` chooses between broadcasting inverses (``1.0``) and broadcasting
   preconditioned gradients from one owner per layer (``1 / world_size``); warns once when the run has
   no K-FAC optimizer;
3. registers ``ddp_comm_hook`` on every device type (Lightning registers comm hooks only on CUDA);
4. launches the forward's partly filled factor buckets right after ``training_step`` returns, so the
   ``A`` reductions overlap the backward (full buckets go out from the hooks as they fill).

Registered as ``"ddp_kfac"`` (subprocess launch, like ``"ddp"``) and ``"ddp_kfac_spawn"``. Multi-node
runs are Lightning's: ``num_nodes`` with torchrun or SLURM environments, detected as for ``"ddp"``.

Example::

    trainer = Trainer(strategy="ddp_kfac", accelerator="gpu", devices=8, num_nodes=4)
    trainer = Trainer(strategy=KFACDDPStrategy(grad_worker_fraction=0.125, bucket_cap_mb=50), devices=8)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from typing_extensions import override

from lightning_lbo.compat import (
    DDP_REGISTER_HOOKS,
    ddp_comm_hook_settings,
    default_class_attribute,
    lightning_package,
    per_package,
    publish_per_package,
    register_ddp_comm_hook,
    strategy_timeout,
)

STRATEGY_NAME = "ddp_kfac"
SPAWN_STRATEGY_NAME = "ddp_kfac_spawn"


@per_package
def kfac_ddp_strategy_class(package: str) -> type:
    """The ``KFACDDPStrategy`` class built on ``package``'s ``DDPStrategy`` (one class per package)."""
    pl = lightning_package(package)
    rank_zero_warn = pl.utilities.rank_zero_warn
    fitting = pl.trainer.states.TrainerFn.FITTING

    class KFACDDPStrategy(pl.strategies.DDPStrategy):
        """DDP with K-FAC curvature sync: async bucketed factor averaging, LPT inverse assignment.

        Args:
            grad_worker_fraction: fraction of ranks that precondition each layer. ``1.0``: the
                owner of a layer broadcasts its inverses, every rank preconditions (more memory,
                less communication per step); ``1 / world_size``: the owner preconditions and
                broadcasts the preconditioned gradient (KAISA's memory-optimal end).
            bucket_cap_mb: size of a factor all-reduce bucket in MiB.
            async_factors: launch factor reductions without blocking, waited on before inversion.
            pack_symmetric: send symmetric factors as packed upper triangles.
            factor_reduce_dtype: ``None`` (factors' dtype) or ``torch.bfloat16``: factors travel
                rounded to 16 bits and are summed in fp32 on every rank (half the factor bytes; see
                :class:`~lightning_lbo.optim.kfac.distributed.TorchDistributedCommunicator`).
            **kwargs: everything :class:`DDPStrategy` takes (``ddp_comm_hook``, ``start_method``,
                ``process_group_backend``, ``find_unused_parameters``, ...).

        Example::

            Trainer(strategy=KFACDDPStrategy(grad_worker_fraction=1.0), devices=2, num_nodes=2)
        """

        strategy_name = STRATEGY_NAME

        def __init__(self, *args: Any, grad_worker_fraction: float = 1.0, bucket_cap_mb: float = 25.0,
                     async_factors: bool = True, pack_symmetric: bool = True, factor_reduce_dtype: Any = None,
                     **kwargs: Any) -> None:
            from lightning_lbo.optim.kfac.distributed import check_grad_worker_fraction

            check_grad_worker_fraction(grad_worker_fraction)  # the same rule again at setup, with the world size
            if not bucket_cap_mb >= 0:
                raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb}; use a size >= 0 in MiB.")
            super().__init__(*args, **kwargs)
            self.grad_worker_fraction = grad_worker_fraction
            self.bucket_cap_mb = bucket_cap_mb
            self.async_factors = async_factors
            self.pack_symmetric = pack_symmetric
            self.factor_reduce_dtype = factor_reduce_dtype
            self.communicator: Any = None  # TorchDistributedCommunicator once set up
            self._curvature_group: Any = None

        def _register_comm_hook_on_every_device(self) -> None:
            """Replaces DDPStrategy's hook registration (:data:`lightning_lbo.compat.DDP_REGISTER_HOOKS`), which
            registers comm hooks only on CUDA; DDP itself supports them on gloo as well."""
            if ddp_comm_hook_settings(self)[0] is not None:  # the user gave ddp_comm_hook=
                register_ddp_comm_hook(package, self.model, self)

        @override
        def connect(self, model: Any) -> None:
            super().connect(model)
            self.ensure_kfac_callback(model.trainer)

        def ensure_kfac_callback(self, trainer: Any) -> None:
            """Give the run K-FAC's lifecycle owner: the user's ``KFACCallback`` if any, else a silent one.

            Called when the Trainer connects the module, before the module's ``configure_callbacks`` (a
            ``KFACCallback`` returned there replaces this one) and before a checkpoint is restored.
            """
            from lightning_lbo.callbacks.kfac import KFACCallback
            from lightning_lbo.callbacks.kfac_lifecycle import KFACLifecycle

            if not any(isinstance(c, KFACLifecycle) for c in trainer.callbacks):
                # a new list, as Lightning's own configure_callbacks handling does
                trainer.callbacks = [*trainer.callbacks, KFACCallback(log_every_n_steps=0, require_kfac=False)]

        @override
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            output = super().training_step(*args, **kwargs)
            if self.communicator is not None:
                self.communicator.flush()  # the forward's A factors travel while the backward runs
            return output

        @override
        def setup(self, trainer: Any) -> None:
            super().setup(trainer)
            if trainer.state.fn == fitting:
                self.setup_curvature_sync()

        @property
        def curvature_settings(self) -> dict[str, Any]:
            """The knobs every rank must share (checked across ranks when K-FAC is attached)."""
            return {"grad_worker_fraction": self.grad_worker_fraction, "bucket_cap_mb": self.bucket_cap_mb,
                    "async_factors": self.async_factors, "pack_symmetric": self.pack_symmetric,
                    "factor_reduce_dtype": str(self.factor_reduce_dtype)}

        def setup_curvature_sync(self) -> None:
            """Build the communicator that ``KFACCallback`` injects into every K-FAC instance at ``on_fit_start``.

            Raises ValueError when ``grad_worker_fraction`` gives no valid number of grad workers for the world size
            (the communicator applies the constructor's rule with the world size).
            """
            # Imported here so that registering this strategy stays light.
            from lightning_lbo.callbacks.kfac_lifecycle import find_kfac
            from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

            if not find_kfac(self.optimizers, self.lightning_module):
                rank_zero_warn("strategy='ddp_kfac' found no K-FAC optimizer: it trains like strategy='ddp'. Return "
                               "lightning_lbo.KFAC(self, ...) from configure_optimizers, or use strategy='ddp'.",
                               category=UserWarning)
            if dist.is_initialized():
                if self._curvature_group is None:
                    # K-FAC's own group: its collectives never interleave with DDP's gradient buckets, and
                    # wait for a frozen peer no longer than DDP's own (the strategy's timeout).
                    self._curvature_group = dist.new_group(backend=dist.get_backend(),
                                                           timeout=strategy_timeout(self))
                self.communicator = TorchDistributedCommunicator(
                    group=self._curvature_group, bucket_cap_mb=self.bucket_cap_mb, async_op=self.async_factors,
                    pack_symmetric=self.pack_symmetric, grad_worker_fraction=self.grad_worker_fraction,
                    reduce_dtype=self.factor_reduce_dtype,
                    # layers that run on some ranks only (find_unused_parameters): reduce by block at step time
                    reduce_in_hooks=self.async_factors and not self._ddp_kwargs.get("find_unused_parameters", False))

        @classmethod
        @override
        def register_strategies(cls, strategy_registry: Any) -> None:
            for name, start_method in ((STRATEGY_NAME, "popen"), (SPAWN_STRATEGY_NAME, "spawn")):
                if name not in strategy_registry:
                    strategy_registry.register(
                        name, cls, start_method=start_method,
                        description=f"DDP with K-FAC curvature sync (lightning_lbo), start_method '{start_method}'")

    # Lightning's private hook-registration method, named in one place (compat), overridden here.
    setattr(KFACDDPStrategy, DDP_REGISTER_HOOKS, KFACDDPStrategy._register_comm_hook_on_every_device)
    return publish_per_package(KFACDDPStrategy, __name__, package)



# Built on first access, so that registering with lightning.pytorch imports no pytorch_lightning.
__getattr__ = default_class_attribute(__name__, "KFACDDPStrategy", kfac_ddp_strategy_class)
