"""DTensor helpers for code that must stay right on sharded parameters (``fully_shard`` / FSDP2), pure torch.

Under ``fully_shard`` every parameter, gradient and optimizer-state tensor is a ``DTensor`` whose
``to_local()`` is the shard this rank holds (dim 0 rows). Two traps follow for code written for plain
tensors: reductions over DTensors give DTensors (a whole-parameter norm, correct but not mixable with
plain tensors until read out with :func:`replicated_value`), and autograd never reaches the sharded
parameters (FSDP2 computes with gathered copies and writes the reduce-scattered gradient into
``.grad`` itself): ``torch.autograd.grad`` and tensor hooks on them see nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
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
