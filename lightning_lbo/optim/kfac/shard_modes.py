"""Where K-FAC's curvature lives and is applied across ranks: the placement modes (``shard_placement=``).

Three modes, chosen with ``KFAC(..., shard_placement=...)`` / ``KFACPreconditioner(..., shard_placement=...)``:

``"replicate"`` (default, exact)
    Every rank holds every factor and every inverse (each inverse computed by one rank and broadcast);
    a sharded layer's whole gradient is all-gathered on every rank and preconditioned there
    (:mod:`~lightning_lbo.optim.kfac.placement`). Curvature memory per rank: all of it.

``"owner"`` (exact, memory-saving)
    Each preconditioned block has one owner rank (:func:`owners`: greedy longest-processing-time on the
    block's curvature bytes, deterministic, identical on every rank). Factor statistics are all-reduced as
    in the replicate mode and committed on every rank, then every rank that does not own the block drops
    them at once (:meth:`~.blocks.CurvatureBlock.release`): the all-reduce keeps the communicator's packed,
    bucketed, possibly overlapped reductions and the cross-rank "finite" decision unchanged, at twice the
    traffic of a reduce to the owner (a ring all-reduce moves ``2 (P - 1) / P`` of the payload per rank, a
    reduce ``(P - 1) / P``); the statistic of every block exists transiently on every rank anyway (the hooks
    compute it from the local batch). Only the owner holds the running average and the inverse, and only it
    inverts. Preconditioning: the owner gathers the whole gradient of its block (one ``gather`` of the
    rows), applies the inverse, and sends each rank its rows back (one ``scatter``); the KL clip's
    ``sum <P, g>`` is each owner's part, summed with one all-reduce. Curvature memory per rank: about 1/P.
    Checkpoints: :meth:`OwnerPlacement.block_states` materialises every block's state from its owner
    (``all_gather_object``: a collective, and a transient peak of the whole curvature on every rank while
    the state dict exists); loading keeps only the owned blocks, the owners re-derived at the new world size
    (resume at another P). Not with ``stale_statistics`` (its "changed little" decision needs every rank's
    factor).

``"local"`` (shard-local, an approximation)
    Each rank preconditions only the rows it holds, with ``A`` whole and ``G`` restricted to its rows
    (``G_rr``); no gradient gather: :mod:`.shard_local`.

Every mode records the bytes its collectives carried on the last step in :attr:`Placement.last_step_bytes`
(the communicator's :class:`~lightning_lbo.optim.kfac.distributed.CommStats` differences).

Pure torch: no Lightning import; ``torch.distributed`` only where a collective runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lbo._dtensor import is_dtensor, local_tensor
from lightning_lbo.optim.kfac import inversion
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.settings import resolve

__all__ = ["PLACEMENTS", "Placement", "ReplicatePlacement", "OwnerPlacement", "make_placement", "owners",
           "curvature_bytes"]

#: the valid values of ``shard_placement``
PLACEMENTS = ("replicate", "owner", "local")


def make_placement(name: str, stale_statistics: Any = None) -> Placement:
    """The placement object of ``shard_placement=name``; an unknown name (or a combination the mode does not
    support) raises ``ValueError`` naming the choices."""
    if name not in PLACEMENTS:
        raise ValueError(f"Invalid shard_placement: {name!r}; choose one of {PLACEMENTS} ('replicate': every rank "
                         "holds all curvature; 'owner': exact, each block on one rank; 'local': each rank "
                         "preconditions its own rows, an approximation).")
    if name != "replicate" and stale_statistics is not None:
        raise ValueError(f"shard_placement={name!r} does not support stale_statistics (its 'changed little' "
                         "decision compares every rank's copy of each factor); use shard_placement='replicate' or "
                         "stale_statistics=None.")
    if name == "local":
        from lightning_lbo.optim.kfac.shard_local import ShardLocalPlacement  # it builds on this module

        return ShardLocalPlacement()
    return OwnerPlacement() if name == "owner" else ReplicatePlacement()


def curvature_bytes(pre: Any) -> int:
    """Bytes of the curvature tensors this rank holds (factors, inverses, and what the inverses were built from),
    each storage counted once: what a placement mode saves, read from the tensors themselves."""
    seen: dict[tuple[Any, int], int] = {}
    for block in pre.blocks:
        for t in block.curvature_tensors():
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def owners(blocks: list[CurvatureBlock], world_size: int) -> list[int]:
    """The owner rank of each block: greedy longest-processing-time on its curvature bytes (factor and inverse,
    ``2 * sum numel(factor) * itemsize``), so every rank holds about ``1/P`` of the curvature. Pure: the same
    on every rank."""
    from lightning_lbo.optim.kfac.distributed import greedy_assignment

    itemsize = [torch.empty((), dtype=b.factor_dtype).element_size() for b in blocks]
    sizes = [2.0 * size * sum(math.prod(s) for s in b.factor_shapes().values()) for b, size in zip(blocks, itemsize,
                                                                                                  strict=True)]
    return greedy_assignment(sizes, world_size)


def _sharded(t: torch.Tensor) -> bool:
    return is_dtensor(t) and any(p.is_shard() for p in t.placements)


def _chunk(rows: int, world: int) -> int:
    """Rows per rank of a dim-0 split over ``world`` ranks (``torch.chunk``, as ``Shard(0)``/``fully_shard``)."""
    return -(-rows // world)


def _local_rows(t: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)`` of the dim-0 rows of the sharded DTensor ``t`` this rank holds (checked)."""
    mesh = t.device_mesh
    world, rank, rows = mesh.size(), mesh.get_local_rank(), t.shape[0]
    chunk = _chunk(rows, world)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    if local_tensor(t).shape[0] != stop - start:
        raise ValueError(f"K-FAC shard placement: a parameter of {rows} rows holds {local_tensor(t).shape[0]} on rank "
                         f"{rank} of {world}, not the {stop - start} of an even (torch.chunk) dim-0 split; shard "
                         "with fully_shard's default placement.")
    return start, stop


class Placement:
    """The replicate mode and the interface of every mode: the preconditioner calls these at fixed points of
    :meth:`~.KFACPreconditioner.step` and of checkpointing."""

    name = "replicate"

    def __init__(self) -> None:
        #: the communicator's byte counters (``CommStats.as_dict()``) accumulated over the last step
        self.last_step_bytes: dict[str, int] = {}
        self._counted: dict[str, int] = {}

    def block_types(self, block_types: Mapping[type[nn.Module], type[CurvatureBlock]] | None
                    ) -> Mapping[type[nn.Module], type[CurvatureBlock]] | None:
        """The ``block_types`` the preconditioner builds its blocks from (a mode may swap in its own)."""
        return block_types

    def after_commit(self, pre: Any) -> None:
        """After a step's statistics are committed (before inversion)."""

    def update_inverses(self, pre: Any) -> None:
        pre._update_inverses()

    def precondition(self, pre: Any, lr: float | None) -> None:
        pre._precondition(lr)
        self._count_step(pre)

    def block_states(self, pre: Any) -> list[dict[str, Any]]:
        """Every block's flat state (:meth:`~.blocks.CurvatureBlock.state`), for the state dict."""
        return [block.state() for block in pre.blocks]

    def after_load(self, pre: Any) -> None:
        """After a checkpoint was restored into every block."""

    def _count_step(self, pre: Any) -> None:
        stats = getattr(pre.comm, "stats", None)
        if stats is None:
            return
        now = stats.as_dict()
        self.last_step_bytes = {k: v - self._counted.get(k, 0) for k, v in now.items()}
        self._counted = now


ReplicatePlacement = Placement


# ------------------------------------------------------------------------------------------------ owner mode
@contextmanager
def _stand_ins(block: Any, values: dict[str, torch.Tensor | None], grads: dict[str, torch.Tensor]):
    """While inside, ``block.<name>`` are plain parameters with the given (whole or local) values and gradients
    (``values[name]`` ``None``: uninitialised, for blocks that only read the gradient)."""
    saved = {name: getattr(block, name) for name in grads}
    for name, grad in grads.items():
        value = values.get(name)
        stand_in = nn.Parameter(value if value is not None else torch.empty_like(grad), requires_grad=False)
        stand_in.grad = grad
        setattr(block, name, stand_in)
    try:
        yield
    finally:
        for name, p in saved.items():
            setattr(block, name, p)


def _names(block: Any) -> list[str]:
    return [n for n in ("weight", "bias") if getattr(block, n, None) is not None]


class OwnerPlacement(Placement):
    """Exact and memory-saving: each block on one owner rank (see the module docstring)."""

    name = "owner"

    def __init__(self) -> None:
        super().__init__()
        self._owners: list[int] | None = None
        self._key: tuple[int, int] | None = None

    # ---- who owns what
    def owners(self, pre: Any) -> list[int]:
        key = (len(pre.blocks), pre.comm.world_size)
        if self._key != key:
            self._owners, self._key = owners(pre.blocks, pre.comm.world_size), key
        return self._owners

    def _release_others(self, pre: Any) -> None:
        rank = pre.comm.rank
        for block, owner in zip(pre.blocks, self.owners(pre), strict=True):
            if owner != rank:
                block.release()

    def after_commit(self, pre: Any) -> None:
        if pre.comm.is_distributed:
            self._release_others(pre)

    def after_load(self, pre: Any) -> None:
        if pre.comm.is_distributed:  # else at the first step, once the communicator is injected
            self._release_others(pre)

    # ---- inversion: the owner alone, nothing broadcast
    def update_inverses(self, pre: Any) -> None:
        if not pre.comm.is_distributed:
            return pre._update_inverses()
        due = pre.steps % max(1, int(resolve(pre.inverse_update_interval, pre.steps))) == 0
        rank = pre.comm.rank
        mine = [b for b, owner in zip(pre.blocks, self.owners(pre), strict=True) if owner == rank
                and b.needs_inverse(due)]
        if not mine:
            return None
        damping = pre.current_damping()
        jobs = [block.inverse_job(pre.inverse_method, damping, allow_low_rank=False) for block in mine]
        inverses, failed = inversion.invert_with_fallback(jobs)
        pre.inverse_fallbacks += len(failed)
        for job, inverse in zip(jobs, inverses, strict=True):
            job.block.install(job, rank, inverse)
        return None

    # ---- preconditioning: gather to the owner, apply, scatter the rows back
    def precondition(self, pre: Any, lr: float | None) -> None:
        if not pre.comm.is_distributed:
            return super().precondition(pre, lr)
        import torch.distributed as dist

        comm, rank, damping = pre.comm, pre.comm.rank, pre.current_damping()
        stats = getattr(comm, "stats", None)
        written: list[torch.Tensor] = []  # this rank's rows of every preconditioned gradient (scaled by the clip)
        dots: list[torch.Tensor] = []
        for block, owner in zip(pre.blocks, self.owners(pre), strict=True):
            # every rank decides alike from host state: all statistics estimated once <=> the owner has an inverse
            if not all(block.refreshes[s] > 0 for s in block.stat_names) or any(p.grad is None for p in block.params):
                continue
            if owner == rank and block.inverse is None:
                raise RuntimeError(f"K-FAC owner placement: rank {rank} owns {block.name!r} but holds no inverse.")
            names = _names(block)
            params = [getattr(block, n) for n in names]
            if len(params) != len(block.params):  # decided alike on every rank, before any collective
                raise ValueError(f"K-FAC shard_placement='owner' preconditions layers whose parameters are their "
                                 f"weight and bias; {block.name!r} ({type(block).__name__}) reads others "
                                 "(attention's projections). Use shard_placement='replicate', or "
                                 f"exclude the layer: KFAC(..., exclude=[{block.name!r}]).")
            if any(_sharded(p) for p in params):
                dot = self._gathered(block, names, params, owner, rank, comm.world_size, damping, pre.l2, stats,
                                      written)
            else:  # replicated parameters (DDP): the owner preconditions, the others receive P
                dot = self._broadcast(block, names, params, owner, rank, damping, pre.l2, comm, written)
            if dot is not None:
                dots.append(dot)
        if pre.kl_clip is not None and written:
            device = written[0].device
            vg = (torch.stack([d.to(torch.float64) for d in dots]).sum() if dots
                  else torch.zeros((), dtype=torch.float64, device=device))
            dist.all_reduce(vg, group=getattr(comm, "group", None))  # each owner's part of sum <P, g>
            if stats is not None:
                stats.decision_bytes += vg.element_size()
            nu = torch.sqrt(pre.kl_clip / (lr ** 2 * vg.abs().clamp_min(1e-30))).clamp(max=1.0)
            nu = torch.where(torch.isfinite(nu), nu, torch.ones_like(nu))
            for dtype in {t.dtype for t in written}:
                same = [t for t in written if t.dtype == dtype]
                torch._foreach_mul_(same, nu.to(dtype))
            pre.last_kl_clip_factor = nu
        self._count_step(pre)
        return None

    @staticmethod
    def _apply(block: Any, damping: float, l2: float) -> torch.Tensor:
        """On the owner, inside the stand-ins: write ``P`` into the whole gradients, return ``<P, g>`` (0-d)."""
        g = block.grad_matrix()
        if l2 > 0:
            g = g + l2 * block.param_matrix()
        p = block.inverse.apply(g, damping)
        dot = torch.vdot(p.reshape(-1), g.reshape(-1))  # before set_grad: g may view the gradient it overwrites
        block.set_grad(p)
        return dot

    def _gathered(self, block, names, params, owner, rank, comm_world, damping, l2, stats, written):
        import torch.distributed as dist

        mesh = params[0].device_mesh
        group, world = mesh.get_group(0), mesh.size()
        # owners are K-FAC communicator ranks; the gather runs on the mesh: the two must number ranks alike
        if world != comm_world or mesh.get_local_rank() != rank or any(not _sharded(p) for p in params):
            raise ValueError(f"K-FAC owner placement: layer {block.name!r} has parameters sharded over {world} "
                             f"ranks and replicated ones, or K-FAC's communicator ({comm_world} ranks) numbers its "
                             "ranks unlike the mesh; shard every parameter with fully_shard over K-FAC's ranks (a "
                             "1-D data-parallel mesh).")
        for p in params:
            _local_rows(p)  # checks the split
        dst = dist.get_global_rank(group, owner)
        tensors = [p.grad for p in params] + ([p for p in params] if l2 > 0 else [])
        chunks = [_chunk(t.shape[0], world) for t in tensors]
        pieces = []
        for t, c in zip(tensors, chunks, strict=True):
            local = local_tensor(t).detach()
            padded = local.new_zeros((c, *t.shape[1:]))
            padded[:local.shape[0]] = local
            pieces.append(padded.reshape(-1))
        dtypes = {piece.dtype for piece in pieces}
        if len(dtypes) > 1:
            raise ValueError(f"K-FAC owner placement: layer {block.name!r} has parameters/gradients of dtypes "
                             f"{sorted(map(str, dtypes))}; use one dtype per layer.")
        buffer = torch.cat(pieces)
        gathered = [torch.empty_like(buffer) for _ in range(world)] if rank == owner else None
        dist.gather(buffer, gathered, dst=dst, group=group)
        if stats is not None:
            stats.shard_gather_bytes += buffer.numel() * buffer.element_size() * world
        dot, scattered = None, None
        if rank == owner:
            wholes, offset = [], 0
            for t, c in zip(tensors, chunks, strict=True):
                size = c * math.prod(t.shape[1:])
                wholes.append(torch.cat([g[offset:offset + size].view(c, *t.shape[1:]) for g in gathered])[:t.shape[0]])
                offset += size
            grads = dict(zip(names, wholes[:len(names)], strict=True))
            values = dict(zip(names, wholes[len(names):], strict=False))
            with _stand_ins(block, values, grads):
                dot = self._apply(block, damping, l2)
            scattered = []
            for r in range(world):
                parts = []
                for whole, c in zip(wholes[:len(names)], chunks, strict=False):
                    piece = whole.new_zeros((c, *whole.shape[1:]))
                    rows = whole[r * c:(r + 1) * c]
                    piece[:rows.shape[0]] = rows
                    parts.append(piece.reshape(-1))
                scattered.append(torch.cat(parts))
            out = torch.empty_like(scattered[0])
        else:
            out = buffer.new_empty(sum(c * math.prod(t.shape[1:]) for t, c in zip(tensors[:len(names)], chunks,
                                                                                  strict=False)))
        dist.scatter(out, scattered, src=dst, group=group)
        if stats is not None:
            stats.shard_scatter_bytes += out.numel() * out.element_size() * world
        offset = 0
        for p, c in zip(params, chunks, strict=False):
            local = local_tensor(p.grad)
            size = c * math.prod(p.shape[1:])
            local.copy_(out[offset:offset + local.numel()].view(local.shape))
            offset += size
            written.append(local)
        return dot

    def _broadcast(self, block, names, params, owner, rank, damping, l2, comm, written):
        dot = None
        if rank == owner:
            dot = self._apply(block, damping, l2)
        grads = [p.grad for p in params]
        comm.broadcast(grads, src=owner)
        written.extend(grads)
        return dot

    # ---- checkpoints: every block's state from its owner
    def block_states(self, pre: Any) -> list[dict[str, Any]]:
        if not pre.comm.is_distributed:
            return super().block_states(pre)
        import torch.distributed as dist

        rank = pre.comm.rank
        device = pre.blocks[0].weight.device
        mine = {i: _to(block.state(), torch.device("cpu")) for i, (block, owner)
                in enumerate(zip(pre.blocks, self.owners(pre), strict=True)) if owner == rank}
        gathered: list[Any] = [None] * pre.comm.world_size
        dist.all_gather_object(gathered, mine, group=getattr(pre.comm, "group", None))
        states = {i: state for part in gathered for i, state in part.items()}
        return [_to(states[i], device) for i in range(len(pre.blocks))]


def _to(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
