"""What K-FAC needs from its surroundings and cannot build itself, checked once, at the first step.

Under Lightning, :class:`~lightning_lbo.callbacks.kfac.KFACCallback` (added by the user, or by
``strategy="ddp_kfac"``) provides it; outside Lightning, the user does. Without it K-FAC would not crash:
it would train silently wrong (each rank with its own curvature; factors multiplied by the square of the
AMP loss scale). :func:`check_bound` turns both into an error naming the fix. Pure torch: no Lightning import.
"""

from __future__ import annotations

from typing import Any

import torch

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
