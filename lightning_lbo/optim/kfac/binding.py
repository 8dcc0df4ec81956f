"""Binding a preconditioner: the blocks of its model, and what it needs from its surroundings.

:func:`build_blocks` turns a model into the blocks a preconditioner drives (the traversal, the diagnostics of
what is left out, each block's precision and first schedule) when it binds.

What K-FAC needs from its surroundings and cannot build itself is checked once, at the first step. Under
Lightning, :class:`~lightning_lbo.callbacks.kfac.KFACCallback` (added by the user, or by ``strategy="ddp_kfac"``)
provides it; outside Lightning, the user does. Without it K-FAC would not crash:
it would train silently wrong (each rank with its own curvature; factors multiplied by the square of the
AMP loss scale). :func:`check_bound` turns both into an error naming the fix. Pure torch: no Lightning import.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import placement
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.blocks.registry import BlockRegistry, find_blocks
from lightning_lbo.optim.kfac.settings import CurvatureSettings, InverseSettings, ScheduleSettings, resolve

_FIX = ("With Lightning, pass callbacks=[lightning_lbo.callbacks.KFACCallback()] to the Trainer (or use "
        'strategy="ddp_kfac", which adds it)')


def check_communicator(preconditioner: Any) -> None:
    """Raise when a multi-rank process group is initialised but K-FAC has the single-process communicator.

    A communicator injected on purpose (``set_communicator``, or ``comm=`` at construction) is respected.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if preconditioner.comm.is_distributed or getattr(preconditioner, "_comm_injected", False):
        return
    raise RuntimeError(
        f"K-FAC runs in a process group of {dist.get_world_size()} ranks with no communicator, so each rank would "
        f"keep its own curvature. {_FIX}; outside Lightning, inject one: pre.set_communicator(default_communicator()) "
        "(lightning_lbo.optim.kfac.distributed; for KFAC, opt.preconditioner).")


def check_grad_scaler(preconditioner: Any) -> None:
    """Raise when float16 output gradients were captured and K-FAC has no AMP grad scaler.

    fp16 gradients come from a loss multiplied by a grad scaler's scale (16-mixed), which the ``G``
    factors must divide out; without the scaler they would carry ``scale^2``. A float16 model trained
    without loss scaling passes a disabled scaler (``torch.amp.GradScaler(enabled=False)``: no division).
    """
    capture = getattr(preconditioner, "capture", None)
    if preconditioner.grad_scaler is not None or capture is None:
        return
    if torch.float16 in getattr(capture, "output_grad_dtypes", ()):
        raise RuntimeError(
            "K-FAC captured float16 output gradients (16-mixed) but has no AMP grad scaler, so its G factors would "
            f"carry the loss scale squared. {_FIX}; outside Lightning, pass KFAC(..., grad_scaler=scaler) or set "
            "opt.preconditioner.grad_scaler = scaler (a model trained in float16 without loss scaling: "
            "torch.amp.GradScaler(enabled=False)).")


def check_bound(preconditioner: Any) -> None:
    """Check once per preconditioner (later calls return at once) that K-FAC got what its wiring provides.

    Called by the preconditioner at its first step, before any statistic is committed. Raises
    RuntimeError naming ``KFACCallback()`` / ``strategy="ddp_kfac"`` (see :func:`check_communicator`,
    :func:`check_grad_scaler`).
    """
    if getattr(preconditioner, "_binding_checked", False):
        return
    check_communicator(preconditioner)
    check_grad_scaler(preconditioner)
    preconditioner._binding_checked = True


def build_blocks(module: nn.Module, registry: BlockRegistry, curvature: CurvatureSettings, schedule: ScheduleSettings,
                 inverses: InverseSettings, factor_dtype: torch.dtype, params: Iterable[torch.Tensor] | None
                 ) -> list[CurvatureBlock]:
    """The blocks of ``module``'s supported layers (:func:`~.blocks.registry.find_blocks`), ready to capture.

    Raises ``ValueError`` when no layer is supported and warns listing the layers left to the plain update. Each
    block gets the first refresh interval and, when the precision is left to K-FAC (``curvature.factor_dtype``
    ``None``), fp64 factors where its inverse damps exactly below fp32's precision
    (:meth:`~.settings.InverseSettings.needs_fp64_factors`); a sharded parameter K-FAC cannot handle raises.
    """
    inverses.warn_fp32_eigen(curvature.factor_dtype, stacklevel=4)
    blocks, unsupported = find_blocks(module, registry, exclude=curvature.exclude, params=params,
                                      factor_dtype=factor_dtype, linear_variant=curvature.linear_variant)
    if not blocks:
        supported = ", ".join(t.__name__ for t in registry.types)
        raise ValueError(f"{type(module).__name__} has no layer K-FAC supports ({supported}) among the "
                         "optimized, non-excluded parameters; use a first-order optimizer.")
    if unsupported:
        layers = "1 layer" if len(blocks) == 1 else f"{len(blocks)} layers"
        warnings.warn(f"K-FAC preconditions {layers}; these get the plain momentum-SGD update: "
                      f"{', '.join(unsupported)}.", UserWarning, stacklevel=4)
    interval = int(resolve(schedule.factor_update_interval, 0))
    for block in blocks:
        placement.check_shardable(block)
        block.start_schedule(interval)
        if curvature.factor_dtype is None and inverses.needs_fp64_factors(block.inverse_type(inverses.inverse_method)):
            block.promote_factor_dtype(torch.float64)
    return blocks
