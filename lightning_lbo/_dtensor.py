"""DTensor helpers for code that must stay right on sharded parameters (``fully_shard`` / FSDP2), pure torch.

Under ``fully_shard`` every parameter, gradient and optimizer-state tensor is a ``DTensor`` whose
``to_local()`` is the shard this rank holds (dim 0 rows). Two traps follow for code written for plain
tensors: reductions over DTensors give DTensors (a whole-parameter norm, correct but not mixable with
plain tensors until read out with :func:`replicated_value`), and autograd never reaches the sharded
parameters (FSDP2 computes with gathered copies and writes the reduce-scattered gradient into
``.grad`` itself): ``torch.autograd.grad`` and tensor hooks on them see nothing, unless the full
parameters are held for the duration (:func:`fsdp_unsharded`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter, gradient, state).

    Without importing ``torch.distributed.tensor`` (about a second): no DTensor exists before it is imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def any_dtensor(tensors: Iterable[Any]) -> bool:
    """True when any of ``tensors`` is a DTensor."""
    return any(is_dtensor(t) for t in tensors)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank stores (a view sharing its memory: writes reach ``t``); ``t`` itself if plain."""
    return t.to_local() if is_dtensor(t) else t


def replicated_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value of ``t`` (gathered from the shards if need be; a collective then)."""
    return t.full_tensor() if is_dtensor(t) else t


def refuse_dtensors(tensors: Iterable[Any], what: str, instead: str) -> None:
    """Raise ``TypeError`` when ``tensors`` hold a DTensor: ``what`` cannot see sharded parameters; ``instead``."""
    if any_dtensor(tensors):
        raise TypeError(f"{what} does not work on sharded parameters (DTensors from fully_shard / FSDP2): autograd "
                        f"and tensor hooks never reach them, FSDP computes with gathered copies. {instead}")


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can have been sharded by it
    cls = getattr(fsdp, "FSDPModule", None)
    return [m for m in model.modules() if isinstance(m, cls)] if cls is not None else []


@contextmanager
def fsdp_unsharded(model: torch.nn.Module) -> Iterator[list[torch.nn.Parameter]]:
    """Hold the full parameters of every ``fully_shard`` (FSDP2) submodule while inside; a no-op without FSDP2.

    Inside, ``model.parameters()`` are plain tensors that autograd reaches (what second-order code such as
    Hessian-vector products needs), FSDP neither reshards after forward or backward nor reduce-scatters
    gradients, and every rank holds the whole model (memory: the unsharded parameters). On exit the
    parameters are resharded, FSDP's settings put back and the model's buffers restored (a measurement that
    broadcasts BN statistics leaves each rank's own). Collective (all-gathers): call on every rank.
    Uses FSDP2's public ``unshard``/``reshard``/``set_*`` methods; the previous settings are read from
    its parameter groups, where present.
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield list(model.parameters())
        return
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    settings = []
    for m in modules:
        get_state = getattr(m, "_get_fsdp_state", None)  # private: without it, fully_shard's defaults come back
        group = getattr(get_state(), "_fsdp_param_group", None) if callable(get_state) else None
        after_forward = getattr(group, "post_forward_mesh_info", None) is not None if group is not None else True
        settings.append((after_forward, getattr(group, "reshard_after_backward", True),
                         getattr(group, "reduce_grads", True)))
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        for m in modules:
            m.unshard()
        yield list(model.parameters())
    finally:
        for m, (after_forward, after_backward, sync) in zip(modules, settings, strict=True):
            m.reshard()
            m.set_reshard_after_forward(after_forward, recurse=False)
            m.set_reshard_after_backward(after_backward, recurse=False)
            m.set_requires_gradient_sync(sync, recurse=False)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
