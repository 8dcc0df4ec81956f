"""Where K-FAC's preconditioning of a sharded parameter happens (``fully_shard`` / FSDP2, DTensor parameters).

Under ``fully_shard`` the module hooks still see whole activations and whole output gradients, so
the Kronecker factors, their all-reduce and their inverses are exactly those of data-parallel K-FAC;
only the *gradient* (and the parameter) of a preconditioned layer is a ``DTensor`` sharded on dim 0
(rows: output units of a Linear/Conv weight, tokens of an embedding, units of a norm layer), of which
each rank holds ``to_local()``.

Exact ("replicate") placement, the one implemented: every rank gathers the whole gradient of each
preconditioned layer (one all-gather per tensor, the size of the gradient), applies the inverse to the
whole matrix exactly as one process would, and writes back the rows it owns. Everything the
preconditioner computes from the preconditioned matrices (the KL clip's ``sum <p, g>``) is then a
global quantity, identical on every rank. With the default dim-0 sharding ``grad @ A^-1`` would be
shard-local and only the ``G^-1`` side mixes rows; gathering first keeps one code path for every
block type (an owner placement that gathers only to the owner is the memory-saving variant, not built).

Pure torch: no Lightning import, and no import of ``torch.distributed.tensor`` unless a DTensor exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lbo._dtensor import is_dtensor, local_tensor

__all__ = ["check_shardable", "whole_parameters", "local_rows", "whole_norms", "like_parameter"]


def _shard_dims(t: Any) -> tuple[int, ...]:
    return tuple(p.dim for p in t.placements if p.is_shard())


def check_shardable(block: Any) -> None:
    """Raise ``ValueError`` at bind when ``block``'s sharded parameters are not what this module can handle:
    every DTensor parameter of the block must be ``weight`` or ``bias`` (the attributes swapped by
    :func:`whole_parameters`), on a 1-D mesh, sharded on dim 0 or replicated (``fully_shard``'s default)."""
    attributes = {id(block.weight)} | ({id(block.bias)} if block.bias is not None else set())
    for p in block.params:
        if not is_dtensor(p):
            continue
        if id(p) not in attributes:
            raise ValueError(f"K-FAC cannot precondition layer {block.name!r} ({type(block).__name__}) on sharded "
                             "parameters: it has parameters besides weight and bias. Exclude it "
                             f"(KFAC(..., exclude=[{block.name!r}])) or do not shard it.")
        if p.device_mesh.ndim != 1 or any(d != 0 for d in _shard_dims(p)) or any(pl.is_partial()
                                                                             for pl in p.placements):
            raise ValueError(f"K-FAC supports parameters sharded on dim 0 over a 1-D mesh (fully_shard with "
                             f"data parallelism only); layer {block.name!r} has placements {p.placements} on a "
                             f"{p.device_mesh.ndim}-D mesh. Use ModelParallelStrategy(tensor_parallel_size=1).")


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the plain tensor ``whole`` that the DTensor ``like`` stores on this rank (no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


@contextmanager
def whole_parameters(block: Any, values: bool = False, stats: Any = None) -> Iterator[None]:
    """While inside, ``block.weight`` / ``block.bias`` are plain whole tensors whose ``.grad`` is the whole
    gradient (gathered: a collective, call on every rank in the same block order); on exit the rows this
    rank owns are written back into the sharded gradients. A no-op for a block without DTensor parameters.

    Args:
        block: a curvature block (its ``weight`` / ``bias`` attributes).
        values: also gather the parameter values (only :meth:`param_matrix`, i.e. folded L2, reads them);
            otherwise the stand-ins hold uninitialised values of the right shape.
        stats: a communicator's ``CommStats`` (or ``None``): its ``shard_gather_bytes`` counts the gathered bytes.
    """
    names = [n for n in ("weight", "bias") if getattr(block, n, None) is not None and is_dtensor(getattr(block, n))]
    if not names:
        yield
        return
    sharded = {n: getattr(block, n) for n in names}
    for name, p in sharded.items():
        whole = p.detach().full_tensor() if values else torch.empty(p.shape, dtype=p.dtype, device=p.device)
        stand_in = nn.Parameter(whole, requires_grad=False)
        stand_in.grad = p.grad.full_tensor()
        setattr(block, name, stand_in)
        if stats is not None:
            stats.shard_gather_bytes += p.numel() * p.element_size() * (2 if values else 1)
    try:
        yield
    finally:
        for name, p in sharded.items():
            stand_in = getattr(block, name)
            setattr(block, name, p)
            local_tensor(p.grad).copy_(local_rows(stand_in.grad, p.grad))


def whole_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Norms of whole tensors, plain 0-d tensors: a sharded tensor's is ``sqrt`` of the sum over its shards of
    ``||shard||^2`` (one all-reduce per mesh for all of them), a plain tensor's its own."""
    norms: list[torch.Tensor] = [torch.linalg.vector_norm(local_tensor(t)) for t in tensors]
    by_mesh: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t) and _shard_dims(t):
            by_mesh.setdefault(t.device_mesh, []).append(i)
    for mesh, index in by_mesh.items():
        dtype = torch.float64 if any(norms[i].dtype == torch.float64 for i in index) else torch.float32
        squares = torch.stack([norms[i].to(dtype) ** 2 for i in index])
        torch.distributed.all_reduce(squares, group=mesh.get_group(0))
        for i, s in zip(index, squares.sqrt().unbind(), strict=True):
            norms[i] = s.to(norms[i].dtype)
    return norms


def like_parameter(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's rows of a per-parameter state tensor) as a DTensor laid out like ``param``, or
    ``local`` itself for a plain parameter: optimizer state of a sharded parameter is sharded like it, so
    ``torch.distributed.checkpoint`` saves and reshards it. Shares ``local``'s memory; no communication."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
