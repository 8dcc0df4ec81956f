"""Setup checks of the callbacks that cannot work on sharded parameters (FSDP2 via ModelParallelStrategy, FSDP1).

The check runs in ``setup`` (before ``configure_model`` has sharded anything), so it reads the strategy:
Lightning's ``ModelParallelStrategy`` (``fully_shard`` / FSDP2, DTensor parameters) and ``FSDPStrategy``
(FSDP1 flat parameters), matched by class name along the strategy's MRO so that subclasses and both
``pytorch_lightning`` and ``lightning.pytorch`` count. ``on_fit_start`` repeats it on the parameters
themselves (DTensors), for a strategy this list does not know.
"""

from __future__ import annotations

from typing import Any

from lightning_lbo._dtensor import any_dtensor

#: Lightning strategies whose parameters are sharded across ranks.
SHARDING_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy")
#: What users of a refusing callback can switch to (the model fits on one device, or the callback goes).
USE_DDP = "use strategy='ddp' (the callback works there)"


def parameter_sharding(trainer: Any, pl_module: Any = None) -> str | None:
    """The name of what shards this run's parameters (strategy class, or DTensor parameters), or None."""
    for cls in type(trainer.strategy).__mro__:
        if cls.__name__ in SHARDING_STRATEGIES:
            return cls.__name__
    if pl_module is not None and any_dtensor(pl_module.parameters()):
        return "fully_shard (DTensor parameters)"
    return None


def data_parallel_size(trainer: Any) -> int:
    """Ranks that see different data: the strategy's sampler replicas, else the world size.

    Under ``ModelParallelStrategy`` that is the data-parallel mesh (``data_parallel_size``); its
    ``tensor_parallel_size`` ranks share each batch, so counting the world would overcount the global batch.
    """
    try:
        kwargs = trainer.strategy.distributed_sampler_kwargs
    except (AttributeError, RuntimeError, AssertionError):  # single device; a mesh not built yet
        kwargs = None
    replicas = kwargs.get("num_replicas") if isinstance(kwargs, dict) else None
    return int(replicas) if replicas else int(trainer.world_size)


def refuse_parameter_sharding(trainer: Any, pl_module: Any, what: str, why: str, instead: str = USE_DDP) -> None:
    """Raise ``ValueError`` naming ``what`` cannot run, ``why``, and ``instead``, when parameters are sharded."""
    sharding = parameter_sharding(trainer, pl_module)
    if sharding is not None:
        raise ValueError(f"{what} does not support sharded parameters ({sharding}): {why}. Instead, {instead}.")
