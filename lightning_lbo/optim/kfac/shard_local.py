"""The shard-local placement (``shard_placement="local"``): each rank preconditions only the rows it holds.

An approximation of K-FAC: a Linear/conv layer's rows (output units, ``G``'s dimension) held by rank ``r`` are
preconditioned with ``A`` whole and ``G_rr``, the diagonal block of ``G`` of those rows,
``P_r = G_rr^-1 g_r A^-1``; the coupling between rows held by different ranks is dropped. Exact at P = 1, and for
the unit-wise blocks of BatchNorm/LayerNorm (block-diagonal over units anyway). The ``G`` statistic each rank
all-reduces is the stack of the ``P`` diagonal blocks (``d_g^2 / P`` numbers, the same shape on every rank); every
rank keeps its own block, inverts its own layers (no inverse broadcast) and gathers no gradient. Other layers
(embeddings, attention, tied weights) are preconditioned exactly, as in the replicate mode. Checkpoints keep the
block-diagonal ``G`` of the ranks' ``G_rr`` (assembled at save: a collective); each rank takes its rows at load.
See :mod:`.shard_modes` for the other modes. Pure torch; ``torch.distributed`` only where a collective runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_lbo._dtensor import local_tensor
from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inversion, placement
from lightning_lbo.optim.kfac.blocks import CurvatureBlock
from lightning_lbo.optim.kfac.blocks.conv import Conv2dBlock
from lightning_lbo.optim.kfac.blocks.linear import LinearBlock
from lightning_lbo.optim.kfac.blocks.unitwise import UnitWiseBlock
from lightning_lbo.optim.kfac.settings import resolve
from lightning_lbo.optim.kfac.shard_modes import Placement, _chunk, _local_rows, _names, _sharded, _stand_ins

__all__ = ["ShardLocalPlacement", "local_variant"]


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
