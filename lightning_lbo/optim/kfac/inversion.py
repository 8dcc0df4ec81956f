"""The low-rank (Woodbury) inverse, the choice of method from the factor types, and the fallback ladder.

See :mod:`.inverses` for the dense methods and the precision policy. :func:`method_for` is the one place
the inverse method follows from the factor types (a :class:`~.factors.LowRankFactor` -> Woodbury);
:func:`invert_with_fallback` inverts a list of :class:`InverseJob` with the numerical fallback ladder.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from lightning_lbo.optim.kfac.factors import dense, dense_factors, low_rank
from lightning_lbo.optim.kfac.inverses import (
    BlockInverse,
    CholeskyKronecker,
    _damped_inverse,
    _mean_diagonal,
    _pi,
)

__all__ = ["WoodburyKronecker", "InverseJob", "method_for", "invert_with_fallback", "USED_COLUMNS_AT_MOST"]


class WoodburyKronecker(BlockInverse):
    """:class:`CholeskyKronecker`'s system with a low-rank side, or both, through the Woodbury identity.

    A factor given by ``r`` rows, ``A = U^T U / n`` (a :class:`~lightning_lbo.optim.kfac.factors.LowRankFactor`;
    ``G`` too, or either side a dense tensor), has the damped inverse

    .. math:: (U^T U / n + \\delta I)^{-1} = \\frac{1}{\\delta}\\left(I - V^T V\\right), \\qquad
       V = L^{-1} U, \\quad L L^T = U U^T + n \\delta I \\in \\mathbb{R}^{r \\times r}

    (``V^T V = U^T (U U^T + n \\delta I)^{-1} U``), stored as ``{A,G}_rows = V``. A gradient
    ``[1, d_G, d_A]`` is multiplied by ``V^T`` and ``V``: ``2 r d_G d_A`` multiply-adds per side, against
    ``d_G d_A^2`` for a dense ``A`` side, so rows pay when ``2 r < d_A``; whitening the rows at
    inversion time saves the ``d_G r^2`` of an ``r x r`` product per step. An ``A`` whose rows use at
    most 3/4 of its columns (conv taps that only see padding) keeps ``V`` on the used ones (``A_cols``,
    found with one host sync at inversion time). A factor without rows is inverted densely (Cholesky).
    ``pi`` takes a low-rank side's trace from its rows, ``tr(U^T U / n) = ||U||^2 / n``, so its dense
    factor is never read. The ``1 / delta`` of the low-rank sides is the scale ``s`` of
    :meth:`apply_unscaled`. Single process, groups = 1.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__(**tensors)
        self.names = tuple(tensors)  # which sides are low-rank depends on the instance
        # the columns V uses, host-side (read once at inversion time; see apply_unscaled's ``live``)
        self.a_columns: frozenset[int] | None = None
        self._a_stride: tuple[int, int, int] | None = None  # A_cols as (start, step, count), if evenly spaced

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False, live=None):
        """``live``: gradient columns that can be nonzero (host-side, :meth:`apply_unscaled`): kept among the
        columns ``V`` is stored on even where the rows are zero, so that the step can skip the others."""
        def side(stat: str) -> tuple[tuple[torch.Tensor, int] | None, torch.Tensor | None, torch.Tensor]:
            """(rows U and n, or None), (the dense factor, or None), tr / d; a low-rank side's factor is unread."""
            rows = low_rank(factors[stat])
            if rows is not None:
                return (rows[0].to(dtype), rows[1]), None, factors[stat].mean_trace(dtype)
            factor = dense(factors[stat]).to(dtype)
            return None, factor, _mean_diagonal(factor)

        a_side, g_side = side("A"), side("G")
        pi, root = _pi(a_side[2], g_side[2]), damping ** 0.5
        tensors, ok, scale = {}, torch.ones((), dtype=torch.bool, device=pi.device), torch.ones_like(pi)
        for stat, (rows_n, factor, _), delta in (("A", a_side, pi * root), ("G", g_side, root / pi)):
            if rows_n is not None:
                U, n = rows_n
                # the rows' all-zero columns (conv taps that only ever see padding) are left out
                cols = _used_columns(U, live) if stat == "A" else None
                rows, ok_side = _whitened_rows(U if cols is None else U.index_select(2, cols), n, delta)
                tensors[f"{stat}_rows"] = rows.to(out_dtype)
                if cols is not None:
                    tensors["A_cols"] = cols
                scale = scale / delta
            else:
                inverse, ok_side = _damped_inverse(factor, delta, psd_projection)
                tensors[f"{stat}_inv"] = inverse.to(out_dtype)
            ok = ok & ok_side
        inverse = cls(**tensors, scale=scale.reshape(()).to(out_dtype))
        if "A_cols" in tensors:
            cols = tensors["A_cols"].tolist()  # inversion time: one more host read
            inverse.a_columns = frozenset(cols)
            step = cols[1] - cols[0] if len(cols) > 1 else 1
            if step > 0 and cols == list(range(cols[0], cols[0] + step * len(cols), step)):
                inverse._a_stride = (cols[0], step, len(cols))
        return inverse, ok

    def apply_unscaled(self, grad, damping, live: tuple[int, ...] | None = None):
        """``live``: the only columns of ``grad`` that can be nonzero (host-side, e.g. a conv's taps that read more
        than zero padding). Where they are among the columns ``V`` uses (``A_cols``), both sides run on those
        columns only: elsewhere the gradient and ``V`` are zero, so ``P`` is exactly zero there."""
        d = self.data
        p = self._cast(grad)
        if live is not None and self.a_columns is not None and self.a_columns.issuperset(live):
            V = d["A_rows"]
            q = self._a_columns_of(p).contiguous()
            q = self._g_side(torch.baddbmm(q, torch.bmm(q, V.transpose(1, 2)), V, alpha=-1))
            return self._with_a_columns(torch.zeros_like(p), q).to(grad.dtype), d["scale"].to(grad.dtype)
        if "A_cols" in d:  # (I - V^T V) is the identity on the columns V leaves out (written back to a copy of p)
            V = d["A_rows"]
            q = self._a_columns_of(p).contiguous()
            q = torch.baddbmm(q, torch.bmm(q, V.transpose(1, 2)), V, alpha=-1)
            p = self._with_a_columns(p.clone(), q)
        elif "A_rows" in d:  # p (I - V^T V): one product into a copy of p (baddbmm), no elementwise pass
            V = d["A_rows"]
            p = torch.baddbmm(p, torch.bmm(p, V.transpose(1, 2)), V, alpha=-1)
        else:
            p = torch.bmm(p, d["A_inv"])
        return self._g_side(p).to(grad.dtype), d["scale"].to(grad.dtype)

    def _a_columns_of(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s ``A_cols`` columns: a strided view where they are evenly spaced (one conv tap: a gather along
        the last dimension is ~10x slower than that copy), else a gathered copy."""
        if self._a_stride is not None:
            start, step, count = self._a_stride
            return p[:, :, start:start + step * (count - 1) + 1:step]
        return p[:, :, self.data["A_cols"]]

    def _with_a_columns(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``p`` with its ``A_cols`` columns replaced by ``q`` (in place)."""
        if self._a_stride is not None:
            self._a_columns_of(p).copy_(q)
            return p
        return p.index_copy_(2, self.data["A_cols"], q)

    def _g_side(self, p: torch.Tensor) -> torch.Tensor:
        """``(I - W^T W) p`` (low-rank ``G``, unscaled) or ``G_inv p``."""
        d = self.data
        if "G_rows" in d:
            W = d["G_rows"]
            return torch.baddbmm(p, W.transpose(1, 2), torch.bmm(W, p), alpha=-1)
        return torch.bmm(d["G_inv"], p)

    def apply(self, grad, damping):
        p, scale = self.apply_unscaled(grad, damping)
        return p * scale


#: low-rank A rows with at most this fraction of their columns used are applied on those columns only
USED_COLUMNS_AT_MOST = 0.75


def _used_columns(U: torch.Tensor, live: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The indices of the columns of ``U: [1, r, d]`` with a nonzero entry, or ``None`` if more than
    :data:`USED_COLUMNS_AT_MOST` of them are used (one host sync, at inversion time).

    A column of ``U`` that is zero in every row (a conv tap that reads only padding, e.g. the 8 outer taps
    of a padded 3x3 conv on a 1x1 input) is zero in ``V`` too, so ``I - V^T V`` leaves it unchanged: the
    step multiplies only the used columns (resnet18 layer4 at 32x32: 512 of 4608).
    """
    used = (U[0] != 0).any(0)
    if live is not None:  # columns the gradient may fill: kept (V is zero there), see WoodburyKronecker.apply_unscaled
        used[torch.tensor(live, device=U.device)] = True
    cols = used.nonzero().squeeze(1)
    return cols if cols.numel() <= USED_COLUMNS_AT_MOST * U.shape[2] else None


def _whitened_rows(U: torch.Tensor, n: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``V = L^{-1} U`` with ``L L^T = U U^T + n delta I`` (so ``V^T V = U^T (U U^T + n delta I)^{-1} U``), and an
    ok flag (device tensor; no sync). A failed factorisation is swapped for the identity (the solve would
    divide by its zero pivot) and flagged, as in :func:`_cholesky_inverse`."""
    eye_r = torch.eye(U.shape[1], dtype=U.dtype, device=U.device).expand(U.shape[0], -1, -1)
    chol, info = torch.linalg.cholesky_ex(torch.bmm(U, U.transpose(1, 2)) + (n * delta) * eye_r)
    failed = (info != 0).reshape(*info.shape, 1, 1)
    V = torch.linalg.solve_triangular(torch.where(failed, eye_r, chol), U, upper=False)
    return V, (info == 0).all() & torch.isfinite(V).all()


class InverseJob(NamedTuple):
    """One inverse to compute: the block (for messages), the method, its source factors (``{stat: Factor}``,
    or tensors), the damping and the dtype the inverse is stored in."""

    block: Any
    method: type[BlockInverse]
    factors: dict[str, Any]
    damping: float
    dtype: torch.dtype


def method_for(default: type[BlockInverse], factors: dict[str, Any], allow_low_rank: bool) -> type[BlockInverse]:
    """The inverse method of ``factors``: :class:`WoodburyKronecker` when a factor is low-rank (and that is
    allowed: one process), else the block's ``default``. The one place the method follows from factor types."""
    if allow_low_rank and any(low_rank(f) is not None for f in factors.values()):
        return WoodburyKronecker
    return default


def invert_with_fallback(jobs: list[InverseJob]) -> tuple[list[BlockInverse], list[str]]:
    """Invert every job (:class:`InverseJob`, or a tuple of its fields).

    Ladder: fp32 (fp64 if the storage dtype is fp64), fp64, fp64 on the PSD projection of the factors,
    10x and 100x damping (projected, fp64), identity.
    A Woodbury job whose rows are not finite (a non-finite batch) retries as the dense
    :class:`CholeskyKronecker`; with finite rows it stays low-rank (its failure is on the G side, and a
    dense ``d_A`` inverse would cost far more). One host sync per attempt round (the ok flags of all
    jobs are read together), one more per failed Woodbury job.
    Returns the inverses and the names of blocks that fell back to the plain gradient.
    """
    jobs = [InverseJob(*job) for job in jobs]
    results: list[BlockInverse | None] = [None] * len(jobs)
    methods = [job.method for job in jobs]
    pending = list(range(len(jobs)))
    rungs = ((torch.float32, 1.0, False), (torch.float64, 1.0, False), (torch.float64, 1.0, True),
             (torch.float64, 10.0, True), (torch.float64, 100.0, True))
    for attempt, (dtype, scale, psd_projection) in enumerate(rungs):
        if not pending:
            break
        tries = {}
        for i in pending:
            factors, damping, out_dtype = jobs[i].factors, jobs[i].damping, jobs[i].dtype
            if attempt == 1 and methods[i] is WoodburyKronecker and not all(
                    bool(torch.isfinite(rows[0]).all()) for rows in map(low_rank, factors.values()) if rows):
                methods[i] = CholeskyKronecker
            compute = torch.float64 if out_dtype == torch.float64 else dtype
            if methods[i] is not WoodburyKronecker:  # reads the dense factors (a deferred low-rank A is built)
                factors = dense_factors(factors)
            extra = {}
            if methods[i] is WoodburyKronecker and hasattr(jobs[i].block, "live_columns"):
                extra["live"] = jobs[i].block.live_columns()
            tries[i] = methods[i].from_factors(factors, damping * scale, compute, out_dtype, psd_projection, **extra)
        flags = torch.stack([ok.reshape(()) for _, ok in tries.values()]).tolist()
        pending = []
        for (i, (inverse, _)), ok in zip(tries.items(), flags, strict=True):
            if ok:
                results[i] = inverse
            else:
                pending.append(i)
    failed = []
    for i in pending:
        job = jobs[i]
        failed.append(job.block.name)
        method = CholeskyKronecker if job.method is WoodburyKronecker else job.method  # no low-rank identity
        results[i] = method.identity(dense_factors(job.factors), job.dtype)
    if failed:
        warnings.warn(f"K-FAC: inverting the curvature of {failed} failed in fp32, fp64, on the PSD projection "
                      "and with 100x damping; these layers use the plain gradient until the next inverse update. "
                      "Increase `damping`.",
                      RuntimeWarning, stacklevel=3)
    return results, failed
