"""Where K-FAC's preconditioning of a sharded parameter happens (``fully_shard`` / FSDP2, DTensor parameters).

Under ``fully_shard`` the module hooks still see whole activations and whole output gradients, so
the Kronecker factors, their all-reduce and their inverses are exactly those of data-parallel K-FAC;
only the *gradient* (and the parameter) of a preconditioned layer is a ``DTensor`` sharded on dim 0
(rows: output units of a Linear/Conv weight, tokens of an embedding, units of a norm layer), of which
each rank holds ``to_local()``.

Exact ("replicate") placement, the default (the others, ``owner`` and ``local``, are in
:mod:`.shard_modes` and :mod:`.shard_local`, built on these helpers): every rank gathers the whole gradient of each
preconditioned layer (one all-gather per tensor, the size of the gradient), applies the inverse to the
whole matrix exactly as one process would, and writes back the rows it owns. Everything the
preconditioner computes from the preconditioned matrices (the KL clip's ``sum <p, g>``) is then a
global quantity, identical on every rank. With the default dim-0 sharding ``grad @ A^-1`` would be
shard-local and only the ``G^-1`` side mixes rows; gathering first keeps one code path for every
block type.

The whole tensors stand in for the sharded parameters at every attribute through which a block reads them
(``nn.MultiheadAttention``'s ``in_proj_*`` and ``out_proj.*``, a tied head's weight), so every block type
works. Sharded parameters carry their mesh: :func:`sharded_communicator` gives K-FAC its curvature
communicator on the mesh's process group at bind, so no Lightning callback is needed. FSDP1's flattened
parameters are refused (:func:`refuse_fsdp1`).

Pure torch: no Lightning import, and no import of ``torch.distributed.tensor`` unless a DTensor exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lbo._dtensor import is_dtensor, local_tensor

__all__ = ["refuse_fsdp1", "check_shardable", "sharded_communicator", "whole_parameters", "local_rows", "whole_norms",
           "like_parameter"]


def _shard_dims(t: Any) -> tuple[int, ...]:
    return tuple(p.dim for p in t.placements if p.is_shard())


def refuse_fsdp1(module: nn.Module) -> None:
    """Raise ``ValueError`` at bind when ``module``'s parameters come from FSDP1 (``FullyShardedDataParallel``,
    Lightning's ``FSDPStrategy``), with or without ``use_orig_params``: each rank holds flattened 1-D pieces of the
    original tensors (a piece of a weight matrix, or nothing), which no Kronecker factor matches."""
    if any(getattr(p, "_fsdp_flattened", False) for p in module.parameters()):
        raise ValueError("K-FAC cannot run on FSDP1 parameters (FullyShardedDataParallel, Lightning's FSDPStrategy; "
                         "with or without use_orig_params=True): each rank holds flattened pieces of the weights, "
                         "which no Kronecker factor matches. Shard with fully_shard (FSDP2; Lightning's "
                         "ModelParallelStrategy), which K-FAC supports, or use strategy='ddp_kfac'.")


def _locations(block: Any, param: torch.Tensor) -> list[tuple[Any, str]]:
    """Every attribute through which ``block`` reads ``param``: the block's own (``weight``, ``bias``) and the
    parameters registered on the modules it hooks and their submodules (``nn.MultiheadAttention``'s
    ``in_proj_weight`` and ``out_proj.weight``, a tied head's ``weight``)."""
    found = [(block, name) for name, value in vars(block).items() if value is param]
    seen: set[int] = set()
    for module, _ in block.uses():
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            found.extend((sub, name) for name, value in sub.named_parameters(recurse=False) if value is param)
    return found


def check_shardable(block: Any) -> None:
    """Raise ``ValueError`` at bind when ``block``'s sharded parameters are not what this module can handle:
    every DTensor parameter of the block must be reachable as an attribute of the block or of a module it hooks
    (the attributes swapped by :func:`whole_parameters`), on a 1-D mesh, sharded on dim 0 or replicated
    (``fully_shard``'s default)."""
    for p in block.params:
        if not is_dtensor(p):
            continue
        if not _locations(block, p):
            raise ValueError(f"K-FAC cannot precondition layer {block.name!r} ({type(block).__name__}) on sharded "
                             "parameters: one of its parameters is neither an attribute of the block nor registered "
                             f"on a module it hooks. Exclude it (KFAC(..., exclude=[{block.name!r}])) or do not "
                             "shard it.")
        if p.device_mesh.ndim != 1 or any(d != 0 for d in _shard_dims(p)) or any(pl.is_partial()
                                                                             for pl in p.placements):
            raise ValueError(f"K-FAC supports parameters sharded on dim 0 over a 1-D mesh (fully_shard with "
                             f"data parallelism only); layer {block.name!r} has placements {p.placements} on a "
                             f"{p.device_mesh.ndim}-D mesh. Use ModelParallelStrategy(tensor_parallel_size=1).")


def sharded_communicator(blocks: Sequence[Any]) -> Any:
    """The synchronous curvature communicator on the process group of the blocks' device mesh, or ``None`` when
    no block has a DTensor parameter.

    Sharded parameters carry their mesh, so K-FAC needs nothing from its surroundings to average factors over
    the data-parallel ranks: the mesh's group is the one ``fully_shard`` itself reduces gradients over, created by
    whoever built the mesh (Lightning's ``ModelParallelStrategy``: with ``tensor_parallel_size=1`` it is the
    default group, with the strategy's timeout). No new group is created (no collective at bind).
    """
    meshes = []
    for block in blocks:
        for p in block.params:
            if is_dtensor(p) and all(p.device_mesh is not m for m in meshes):
                meshes.append(p.device_mesh)
    if not meshes:
        return None
    groups = {id(mesh.get_group(0)): mesh.get_group(0) for mesh in meshes}
    if len(groups) > 1:
        raise ValueError(f"K-FAC's layers are sharded over {len(groups)} different process groups; every "
                         "preconditioned parameter must be sharded over the same data-parallel mesh.")
    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    return TorchDistributedCommunicator(group=next(iter(groups.values())), async_op=False)


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the plain tensor ``whole`` that the DTensor ``like`` stores on this rank (no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


@contextmanager
def whole_parameters(block: Any, values: bool = False, stats: Any = None) -> Iterator[None]:
    """While inside, every DTensor parameter of ``block`` (``block.params``) is a plain whole tensor whose ``.grad``
    is the whole gradient (gathered: a collective, call on every rank in the same block order), at every
    attribute through which the block reads it (the block's ``weight`` / ``bias``, ``nn.MultiheadAttention``'s
    ``in_proj_*`` and ``out_proj.*``, a tied head's ``weight``); on exit the original parameters are put back and
    the rows this rank owns are written into their sharded gradients. A no-op for a block without DTensor
    parameters.

    Args:
        block: a curvature block (its ``params``, its attributes and the modules it hooks).
        values: also gather the parameter values (only :meth:`param_matrix`, i.e. folded L2, reads them);
            otherwise the stand-ins hold uninitialised values of the right shape.
        stats: a communicator's ``CommStats`` (or ``None``): its ``shard_gather_bytes`` counts the gathered bytes.
    """
    sharded = [p for p in block.params if is_dtensor(p)]
    if not sharded:
        yield
        return
    swapped = []  # (parameter, its stand-in, where it was)
    for p in sharded:
        whole = p.detach().full_tensor() if values else torch.empty(p.shape, dtype=p.dtype, device=p.device)
        stand_in = nn.Parameter(whole, requires_grad=False)
        stand_in.grad = p.grad.full_tensor()
        swapped.append((p, stand_in, _locations(block, p)))
        if stats is not None:
            stats.shard_gather_bytes += p.numel() * p.element_size() * (2 if values else 1)
    for _, stand_in, where in swapped:
        for owner, name in where:
            setattr(owner, name, stand_in)
    try:
        yield
    finally:
        for p, stand_in, where in swapped:
            for owner, name in where:
                setattr(owner, name, p)
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
