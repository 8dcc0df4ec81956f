"""Momentum correction (Goyal et al. 2017, section 2.1), in one place for the whole package.

When the learning rate changes from ``lr_old`` to ``lr_new``, an update of the form
``v <- m v + lr_t g; w <- w - v`` (the LR *inside* the buffer: Goyal's and LARS's paper form) must
rescale its buffer by ``lr_new / lr_old`` to behave like ``v <- m v + g; w <- w - lr_t v`` (the LR
*outside*: ``torch.optim.SGD``'s form, which needs no correction). Conversely, an LR-outside buffer
follows the *uncorrected* LR-inside update when it is rescaled by ``lr_old / lr_new``.

The protocol: an optimizer that stores its momentum its own way (``LARS``: a 0-d scale times a
buffer) defines ``scale_momentum_(factor, group=None)``; every other optimizer keeps
``state[p]["momentum_buffer"]`` (PyTorch's key). :func:`scale_momentum_` handles both, on the
device, with one foreach multiply and no host sync. :func:`correction_factor` says by how much.
"""

from __future__ import annotations

from typing import Any

import torch

MOMENTUM_BUFFER = "momentum_buffer"


def correction_factor(lr_old: float, lr_new: float, *, lr_in_buffer: bool) -> float:
    """The factor a momentum buffer is multiplied by when the LR goes from ``lr_old`` to ``lr_new``.

    ``lr_in_buffer=True``: Goyal's correction ``lr_new / lr_old`` for a buffer that holds the LR.
    ``lr_in_buffer=False``: ``lr_old / lr_new``, which makes an LR-outside buffer follow the
    *uncorrected* LR-inside update. 1 when either LR is 0 or they are equal.
    """
    if lr_old == lr_new or lr_old == 0 or lr_new == 0:
        return 1.0
    return lr_new / lr_old if lr_in_buffer else lr_old / lr_new


@torch.no_grad()
def scale_momentum_(optimizer: torch.optim.Optimizer, factor: float, group: dict[str, Any] | None = None) -> None:
    """Multiply the momentum buffers of ``group`` (default: every group) of ``optimizer`` by ``factor``.

    Delegates to ``optimizer.scale_momentum_`` when the optimizer defines it; otherwise scales each
    ``state[p]["momentum_buffer"]`` in place (parameters without a buffer yet are skipped).
    """
    if factor == 1.0:
        return
    own = getattr(optimizer, "scale_momentum_", None)
    if callable(own):
        own(factor, group)
        return
    for g in [group] if group is not None else optimizer.param_groups:
        bufs = [optimizer.state[p][MOMENTUM_BUFFER] for p in g["params"]
                if isinstance(optimizer.state.get(p, {}).get(MOMENTUM_BUFFER), torch.Tensor)]
        if bufs:
            torch._foreach_mul_(bufs, factor)
