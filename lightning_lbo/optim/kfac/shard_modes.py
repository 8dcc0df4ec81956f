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
    (``G_rr``, the diagonal block of ``G`` of the rows this rank holds): ``P_r = G_rr^-1 g_r A^-1``; no
    gradient gather. This drops the coupling between rows held by different ranks: an approximation of
    K-FAC (exact at P = 1, and exact for the unit-wise blocks of BatchNorm/LayerNorm, whose Fisher is
    block-diagonal over units anyway). The statistic each rank all-reduces for ``G`` is the stack of the
    ``P`` diagonal blocks (``d_g^2 / P`` numbers instead of ``d_g^2``); every rank keeps its own and inverts
    its own blocks (no inverse broadcast). Layers of other types (embeddings, attention, tied weights) are
    preconditioned exactly as in the replicate mode. Checkpoints keep the block-diagonal ``G`` of the ranks'
    ``G_rr`` (assembled at save: a collective) and each rank takes its rows at load, at any P.

Every mode records the bytes its collectives carried on the last step in :attr:`Placement.last_step_bytes`
(the communicator's :class:`~lightning_lbo.optim.kfac.distributed.CommStats` differences).

Pure torch: no Lightning import; ``torch.distributed`` only where a collective runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lbo._dtensor import is_dtensor, local_tensor
from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inversion, placement
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.blocks.conv import Conv2dBlock
from lightning_lbo.optim.kfac.blocks.linear import LinearBlock
from lightning_lbo.optim.kfac.blocks.unitwise import UnitWiseBlock
from lightning_lbo.optim.kfac.settings import resolve

__all__ = ["PLACEMENTS", "Placement", "ReplicatePlacement", "OwnerPlacement", "ShardLocalPlacement",
           "make_placement", "owners", "curvature_bytes"]

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
    return {"replicate": ReplicatePlacement, "owner": OwnerPlacement, "local": ShardLocalPlacement}[name]()


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


# ------------------------------------------------------------------------------------------- shard-local mode
class _LocalRows:
    """Mixin of the shard-local block variants: the block holds and applies only the curvature of the rows
    (output units) of its weight that this rank stores; see :class:`ShardLocalPlacement`. ``row_stat`` is the
    statistic over those rows; :meth:`_restricted` takes this rank's part of its all-reduced value."""

    row_stat = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "groups", 1) != 1:
            raise ValueError(f"shard_placement='local' does not support grouped convolutions (layer "
                             f"{self.name!r}); use shard_placement='owner' or exclude the layer.")
        w = self.weight
        if _sharded(w):
            self.world, self.rank = w.device_mesh.size(), w.device_mesh.get_local_rank()
            self.rows = _local_rows(w)
        else:  # one process, or a replicated weight: all rows
            self.world, self.rank, self.rows = 1, 0, (0, w.shape[0])
        self.chunk = _chunk(w.shape[0], self.world)

    @property
    def local_count(self) -> int:
        """The number of rows (output units) this rank holds."""
        return self.rows[1] - self.rows[0]

    @property
    def description(self) -> str:  # rank-independent (compared across ranks): the whole layer's shapes
        return f"{type(self).__name__} {tuple(super().factor_shapes().values())}"

    @property
    def low_rank_capable(self) -> bool:
        return False

    def output_part(self, stat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return stat

    def _restricted(self, new: fac.Factor) -> fac.Factor:
        raise NotImplementedError

    def commit(self, stat: str, new: fac.Factor, ok: torch.Tensor, decay: float,
               track_change: bool = False) -> torch.Tensor | None:
        """Commit this rank's part of the reduced statistic (its diagonal block of ``G``, or its units)."""
        if stat == self.row_stat:
            new = self._restricted(new)
        return super().commit(stat, new, ok, decay, track_change)

    def _rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of a row statistic of the whole layer's shape."""
        raise NotImplementedError

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The whole layer's row statistic from every rank's part (rank order): what a checkpoint keeps."""
        raise NotImplementedError

    def _localised(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpointed state whose row statistic has the whole layer's shape (assembled at save, or from an
        exact mode's checkpoint) restricted to this rank's rows; local shapes pass unchanged."""
        whole, out = tuple(super().factor_shapes()[self.row_stat]), dict(state)
        for key in (f"factor.{self.row_stat}", f"inverse.{self.row_stat}"):
            value = out.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == whole:
                out[key] = self._rows_of(value).contiguous()
        return out

    def check_state(self, state: dict[str, Any]) -> bool:
        return super().check_state(self._localised(state))

    def restore(self, state: dict[str, Any], valid: bool, step: int, damping: float) -> None:
        super().restore(self._localised(state), valid, step, damping)

    @contextmanager
    def local_view(self) -> Iterator[None]:
        """While inside, ``weight`` / ``bias`` (and their ``.grad``) are this rank's rows (views: writes land)."""
        names = _names(self)
        values = {n: local_tensor(getattr(self, n)).detach() for n in names}
        grads = {n: local_tensor(getattr(self, n).grad) for n in names}
        with _stand_ins(self, values, grads):
            yield


class _LocalKronecker(_LocalRows):
    """Kronecker block on its rows: ``G_rr`` (the diagonal block of ``G`` of the local output units), ``A`` whole."""

    row_stat = "G"

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(super().factor_shapes())
        shapes["G"] = (1, self.local_count, self.local_count)
        return shapes

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        """The ``P`` diagonal blocks of ``G``'s sum, stacked ``[P, chunk, chunk]`` (zero padded): the same shape
        on every rank, so an all-reduce sums each rank's block correctly; ``d_g^2 / P`` numbers."""
        rows, positions = self.output_rows(grad)
        rows = rows.to(self.factor_dtype).reshape(-1, rows.shape[-1])
        padded = rows.new_zeros(rows.shape[0], self.world * self.chunk)
        padded[:, :rows.shape[1]] = rows
        blocks = padded.view(rows.shape[0], self.world, self.chunk)
        gram = torch.einsum("mpi,mpj->pij", blocks, blocks)
        return gram / positions if positions > 1 else gram

    def _restricted(self, new: fac.Factor) -> fac.Factor:
        n = self.local_count
        return fac.DenseFactor(new.dense()[self.rank:self.rank + 1, :n, :n].contiguous())

    def _rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        start, stop = self.rows
        return whole[:, start:stop, start:stop]

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The block-diagonal ``G`` of the ranks' ``G_rr`` (the curvature this mode uses, as one matrix)."""
        return torch.block_diag(*[part[0] for part in parts]).unsqueeze(0)


class _LocalUnitWise(_LocalRows):
    """Unit-wise block on its units (exact: the unit-wise Fisher is block-diagonal over units)."""

    row_stat = "F"

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"F": (self.local_count, self.k, self.k)}

    def _restricted(self, new: fac.Factor) -> fac.Factor:
        start, stop = self.rows
        return fac.DenseFactor(new.dense()[start:stop].contiguous())

    def _rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        start, stop = self.rows
        return whole[start:stop]

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)


_VARIANTS: dict[type, type | None] = {}


def local_variant(block_type: type[CurvatureBlock]) -> type[CurvatureBlock] | None:
    """The shard-local variant of a block class (``None``: preconditioned exactly, whole gradient gathered)."""
    if block_type not in _VARIANTS:
        # Linear and conv weights hold output units (G's dimension) in their rows; an embedding's rows are tokens
        mixin = (_LocalKronecker if issubclass(block_type, (LinearBlock, Conv2dBlock))
                 else _LocalUnitWise if issubclass(block_type, UnitWiseBlock) else None)
        _VARIANTS[block_type] = None if mixin is None else type(
            f"ShardLocal{block_type.__name__}", (mixin, block_type), {"__module__": __name__})
    return _VARIANTS[block_type]


class ShardLocalPlacement(Placement):
    """Each rank preconditions its own rows with ``G_rr`` and ``A`` (an approximation; see the module docstring)."""

    name = "local"

    def block_types(self, block_types):
        from lightning_lbo.optim.kfac.blocks.registry import BlockRegistry

        types = BlockRegistry.with_overrides(block_types).types
        swapped = {}
        for module_type, block_type in types.items():
            variant = local_variant(block_type)
            swapped[module_type] = variant if variant is not None else block_type
        return swapped

    def update_inverses(self, pre: Any) -> None:
        """Every rank inverts its own blocks (its ``G_rr`` differ from the other ranks'); nothing broadcast."""
        due = pre.steps % max(1, int(resolve(pre.inverse_update_interval, pre.steps))) == 0
        todo = [b for b in pre.blocks if b.needs_inverse(due)]
        if not todo:
            return
        damping, rank = pre.current_damping(), pre.comm.rank
        jobs = [b.inverse_job(pre.inverse_method, damping, allow_low_rank=False) for b in todo]
        empty = [isinstance(b, _LocalRows) and b.local_count == 0 for b in todo]
        work = [job for job, none in zip(jobs, empty, strict=True) if not none]
        inverses, failed = inversion.invert_with_fallback(work) if work else ([], [])
        pre.inverse_fallbacks += len(failed)
        computed = iter(inverses)
        for job, none in zip(jobs, empty, strict=True):  # a rank without rows of a layer applies nothing to it
            inverse = job.method.identity(fac.dense_factors(job.factors), job.dtype) if none else next(computed)
            job.block.install(job, rank, inverse)

    def precondition(self, pre: Any, lr: float | None) -> None:
        damping, l2 = pre.current_damping(), pre.l2
        stats = getattr(pre.comm, "stats", None)
        written: list[torch.Tensor] = []
        dots: list[torch.Tensor] = []
        whole_blocks = []
        for block in pre.blocks:
            if block.inverse is None or any(p.grad is None for p in block.params):
                continue
            if not isinstance(block, _LocalRows):
                whole_blocks.append(block)
                continue
            if block.local_count == 0:
                continue
            with block.local_view():
                g = block.grad_matrix()
                if l2 > 0:
                    g = g + l2 * block.param_matrix()
                p = block.inverse.apply(g, damping)
                dots.append(torch.vdot(p.reshape(-1), g.reshape(-1)))  # before set_grad: g may view the gradient
                block.set_grad(p)
                written.extend(getattr(block, n).grad for n in _names(block))
        for block in whole_blocks:  # exact, as in the replicate mode: the whole gradient on every rank
            sharded = [getattr(block, n) for n in _names(block)]
            with placement.whole_parameters(block, values=l2 > 0, stats=stats):
                g = block.grad_matrix()
                if l2 > 0:
                    g = g + l2 * block.param_matrix()
                p = block.inverse.apply(g, damping)
                dot = torch.vdot(p.reshape(-1), g.reshape(-1))
                block.set_grad(p)
            ranks = pre.comm.world_size if any(_sharded(q) for q in sharded) else 1
            dots.append(dot / ranks)  # every rank holds the whole dot: its share of the sum over ranks
            written.extend(local_tensor(q.grad) for q in sharded)
        if pre.kl_clip is not None and written:
            device = written[0].device
            vg = torch.stack([d.to(torch.float64) for d in dots]).sum() if dots else torch.zeros(
                (), dtype=torch.float64, device=device)
            if pre.comm.is_distributed:
                import torch.distributed as dist

                dist.all_reduce(vg, group=getattr(pre.comm, "group", None))  # the rows of every rank
                if stats is not None:
                    stats.decision_bytes += vg.element_size()
            nu = torch.sqrt(pre.kl_clip / (lr ** 2 * vg.abs().clamp_min(1e-30))).clamp(max=1.0)
            nu = torch.where(torch.isfinite(nu), nu, torch.ones_like(nu))
            for dtype in {t.dtype for t in written}:
                torch._foreach_mul_([t for t in written if t.dtype == dtype], nu.to(dtype))
            pre.last_kl_clip_factor = nu
        self._count_step(pre)

    def block_states(self, pre: Any) -> list[dict[str, Any]]:
        """Every block's state with the row statistics of the whole layer: the ranks' ``G_rr`` assembled into the
        block-diagonal ``G`` (unit-wise: all units), one ``all_gather_object`` (a collective; a transient peak of
        those statistics on every rank). Loading restricts them to the rows each rank holds, at any P."""
        states = [block.state() for block in pre.blocks]
        if not pre.comm.is_distributed:
            return states
        import torch.distributed as dist

        local = [(i, block) for i, block in enumerate(pre.blocks) if isinstance(block, _LocalRows)]
        keys = {i: [k for k in (f"factor.{b.row_stat}", f"inverse.{b.row_stat}")
                    if isinstance(states[i].get(k), torch.Tensor)] for i, b in local}
        mine = {i: {k: states[i][k].cpu() for k in keys[i]} for i, _ in local}
        gathered: list[Any] = [None] * pre.comm.world_size
        dist.all_gather_object(gathered, mine, group=getattr(pre.comm, "group", None))
        for i, block in local:
            for key in keys[i]:
                device = states[i][key].device
                states[i][key] = block.assemble([part[i][key] for part in gathered]).to(device)
        return states
