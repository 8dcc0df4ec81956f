"""Curvature factors as types: each owns its arithmetic, its wire form and its checkpoint form.

A block's statistic (``A``, ``G``, a unit-wise ``F``, ...) is one of

* :class:`DenseFactor`: a batch of symmetric matrices ``[groups, d, d]``;
* :class:`DiagonalFactor`: the diagonal ``[groups, d]`` of a diagonal factor (an embedding's token counts);
* :class:`LowRankFactor`: ``U^T U / n`` given by its rows ``U: [groups, r, d]`` and example count ``n``
  (fresh statistics of a batch with fewer rows than half of ``d``). Its dense value is either computed
  at capture (eager) or built only when first read (the Gram of the rows, ``r d^2`` multiply-adds, the
  largest part of a refresh of a wide layer, which the Woodbury inverse does not need).

Capture produces *parts* (one per micro-batch: a tensor, or a :class:`LowRankFactor` with ``n = 1``);
:func:`total` sums them into a factor with the scaling convention of :mod:`.blocks`; a factor's
:meth:`~Factor.committed` is the running average and the ``where(ok)`` of a refresh decided on the
device. Only this module knows the fields of a low-rank factor (rows, count) and its checkpoint keys;
:func:`~lightning_lbo.optim.kfac.inverses.method_for` picks the inverse from the factor types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Gram = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


class Factor:
    """Base of the factor types: a dense view and the arithmetic of a refresh."""

    #: whether the dense value is a (batch of) symmetric matrices (the communicator packs those)
    symmetric = True

    def dense(self) -> torch.Tensor:
        """The factor as a tensor (a low-rank one's Gram is built here, once)."""
        raise NotImplementedError

    def finite(self) -> torch.Tensor:
        """0-d bool on the device (no sync): every entry finite."""
        return torch.isfinite(self.dense()).all()

    def wire(self) -> list[torch.Tensor]:
        """The tensors a communicator averages across ranks (in place)."""
        return [self.dense()]

    def mean_trace(self, dtype: torch.dtype) -> torch.Tensor:
        """``tr(F) / d`` per group, ``[groups]``, in ``dtype``."""
        return self.dense().to(dtype).diagonal(dim1=1, dim2=2).mean(1)

    def committed(self, previous: Factor | None, ok: torch.Tensor, decay: float, estimated: torch.Tensor,
                  identity: Callable[[], torch.Tensor]) -> Factor:
        """The factor after this refresh (``self`` the new statistic): ``(1 - decay) old + decay new`` where a
        previous estimate exists (``estimated``, 0-d bool), ``new`` otherwise, and ``old`` where not ``ok``."""
        old = identity() if previous is None else previous.dense()
        mixed = self.dense()
        if decay != 1.0 and previous is not None:
            # the identity placeholder of a skipped first refresh is not an estimate: no average with it
            mixed = torch.where(estimated, torch.lerp(old, mixed, decay), mixed)
        return type(self)(torch.where(ok, mixed, old))


class DenseFactor(Factor):
    """A batch of symmetric matrices ``[groups, d, d]``."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def dense(self) -> torch.Tensor:
        return self.value


class DiagonalFactor(DenseFactor):
    """A diagonal factor stored as its diagonal ``[groups, d]``."""

    symmetric = False

    def mean_trace(self, dtype: torch.dtype) -> torch.Tensor:
        return self.value.to(dtype).mean(-1)


class _LazyGram:
    """The Gram ``gram(rows, dtype)`` of one micro-batch's rows, built only if read."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, gram: Gram) -> None:
        self.rows, self.dtype, self.gram = rows, dtype, gram

    def dense(self) -> torch.Tensor:
        return self.gram(self.rows, self.dtype)

    def finite(self) -> torch.Tensor:
        # the Gram's diagonal, the sums of squares, bounds every entry
        return torch.isfinite(self.rows.to(self.dtype).square().sum(1)).all()

    def mergeable(self, other: _LazyGram) -> bool:
        a, b = self.rows, other.rows
        return (a.shape == b.shape and a.dtype == b.dtype and self.dtype == other.dtype
                and a.is_contiguous() and b.is_contiguous())

    def select(self, keep: torch.Tensor, other: _LazyGram) -> _LazyGram:
        return _LazyGram(torch.where(keep, self.rows, other.rows), self.dtype, self.gram)


class _LazySum:
    """``where(ok, sum_k Gram_k / n, fallback)`` built when first read, bit for bit what an eager refresh stores.

    ``fallback``: the previous factor (a tensor, or a callable building the identity placeholder).
    """

    def __init__(self, grams: list[_LazyGram], n: int, ok: torch.Tensor | None = None,
                 fallback: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> None:
        self.grams, self.n, self.ok, self.fallback = grams, n, ok, fallback
        self.value: torch.Tensor | None = None

    def finite(self) -> torch.Tensor:
        return torch.stack([g.finite() for g in self.grams]).all()

    def committed(self, ok: torch.Tensor, previous: Any) -> _LazySum:
        """This sum where ``ok``, else ``previous``. A still lazy ``previous`` of the same layout is merged by
        selecting rows, so refreshes never chain factors (or keep old rows alive) and nothing is built."""
        if (isinstance(previous, _LazySum) and previous.value is None and previous.n == self.n
                and len(previous.grams) == len(self.grams)
                and all(g.mergeable(h) for g, h in zip(self.grams, previous.grams, strict=True))):
            grams = [g.select(ok, h) for g, h in zip(self.grams, previous.grams, strict=True)]
            return _LazySum(grams, self.n, ok | previous.ok, previous.fallback)
        if isinstance(previous, _LazySum):
            previous = previous.dense()
        return _LazySum(self.grams, self.n, ok, previous)

    def dense(self) -> torch.Tensor:
        if self.value is None:
            parts = [g.dense() for g in self.grams]
            total = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)) / self.n
            if self.ok is not None:
                fallback = self.fallback() if callable(self.fallback) else self.fallback
                total = torch.where(self.ok, total, fallback)
            self.value, self.grams, self.fallback = total, [], None
        return self.value


class LowRankFactor(Factor):
    """``U^T U / n`` with rows ``U: [groups, r, d]`` (the Woodbury inverse reads them) and a dense value that is
    a tensor or built when first read.

    Build a capture part with :meth:`part` (``n = 1``); :func:`total` joins parts. A refresh that is not
    committed keeps the old dense value and makes the rows NaN (on the device), so that the Woodbury inverse
    fails and the fallback ladder inverts the dense old factor.
    """

    def __init__(self, rows: torch.Tensor, n: int, value: torch.Tensor | _LazySum | _LazyGram) -> None:
        self.rows, self.n, self._value = rows, n, value

    @classmethod
    def part(cls, rows: torch.Tensor, value: torch.Tensor | None = None, raw: torch.Tensor | None = None,
             gram: Gram | None = None, dtype: torch.dtype | None = None) -> LowRankFactor:
        """One micro-batch: ``rows`` (``U``, factor dtype) and either the statistic ``value`` or, to defer it,
        the ``raw`` rows with the ``gram`` function building it in ``dtype``."""
        return cls(rows, 1, value if value is not None else _LazyGram(raw, dtype, gram))

    @property
    def deferred(self) -> bool:
        """Whether the dense value has not been built yet."""
        return not isinstance(self._value, torch.Tensor) and getattr(self._value, "value", None) is None

    def dense(self) -> torch.Tensor:
        if not isinstance(self._value, torch.Tensor):
            return self._value.dense()
        return self._value

    def finite(self) -> torch.Tensor:
        return self._value.finite() if not isinstance(self._value, torch.Tensor) else torch.isfinite(self._value).all()

    def wire(self) -> list[torch.Tensor]:
        # a deferred Gram exists on one process only (the low-rank inverse is single-process): nothing to average
        return [self._value] if isinstance(self._value, torch.Tensor) else []

    def mean_trace(self, dtype: torch.dtype) -> torch.Tensor:
        """From the rows, ``tr(U^T U / n) / d = ||U||^2 / (n d)``: the dense factor is never read."""
        U = self.rows.to(dtype)
        return U.square().sum((1, 2)) / (self.n * U.shape[2])

    def divided(self, k: float) -> LowRankFactor:
        """The statistic divided by ``k`` (a Python number), rows by ``sqrt(k)``."""
        return LowRankFactor(self.rows / k ** 0.5, self.n, self.dense() / k)

    def unscaled(self, scale: torch.Tensor) -> LowRankFactor:
        """The statistic of gradients scaled by ``scale`` (AMP): divided by ``scale^2``, rows by ``scale``."""
        v = self.dense()
        return LowRankFactor(self.rows / scale.to(device=self.rows.device, dtype=self.rows.dtype), self.n,
                             v / scale.to(device=v.device, dtype=v.dtype).square())

    def committed(self, previous, ok, decay, estimated, identity):
        rows = torch.where(ok, self.rows, float("nan"))
        if isinstance(self._value, _LazySum):  # fresh statistics (decay 1): this one where ok, else the old one
            if previous is None:
                fallback: Any = identity
            else:
                fallback = previous._value if isinstance(previous, LowRankFactor) and previous.deferred \
                    else previous.dense()
            return LowRankFactor(rows, self.n, self._value.committed(ok, fallback))
        dense = DenseFactor(self._value).committed(previous, ok, decay, estimated, identity)
        return LowRankFactor(rows, self.n, dense.value)


def dense(value: Any) -> Any:
    """``value`` as a tensor if it is a :class:`Factor` (or a capture part), else unchanged."""
    return value.dense() if isinstance(value, (Factor, _LazyGram, _LazySum)) else value


def dense_factors(factors: dict[str, Any]) -> dict[str, Any]:
    """``factors`` as ``{name: tensor}`` (for the inverse methods that read dense factors)."""
    return {k: dense(v) for k, v in factors.items()}


def low_rank(factor: Any) -> tuple[torch.Tensor, int] | None:
    """``(U, n)`` of a low-rank factor, else ``None``."""
    return (factor.rows, factor.n) if isinstance(factor, LowRankFactor) else None


def divided(part: Any, k: float) -> Any:
    """A captured part (tensor or low-rank) divided by ``k`` (the uses of a layer in one micro-batch)."""
    return part.divided(k) if isinstance(part, LowRankFactor) else part / k


def unscaled(part: Any, scale: torch.Tensor) -> Any:
    """A captured part of AMP-scaled gradients, unscaled (divided by ``scale^2``)."""
    if isinstance(part, LowRankFactor):
        return part.unscaled(scale)
    return part / scale.to(device=part.device, dtype=part.dtype).square()


def wire(part: Any) -> list[torch.Tensor]:
    """The tensors to reduce across ranks of one captured part (a tensor or a factor)."""
    return part.wire() if isinstance(part, Factor) else [part]


def total(parts: list[Any], n: int, per_example: bool, kind: type[DenseFactor] = DenseFactor) -> Factor:
    """The factor of a (possibly accumulated) batch of ``n`` examples from its micro-batches' sums ``parts``.

    ``per_example``: the parts are sums of ``g g^T`` of the unscaled output gradients (``g = dL/dy``), so the
    per-example statistic is ``n * sum`` (``(n dL/dy)(n dL/dy)^T / n``); otherwise ``sum / n``. Low-rank parts
    give a low-rank factor (rows concatenated); ``kind``: the type of a dense result.
    """
    if parts and all(isinstance(p, LowRankFactor) for p in parts):
        rows = parts[0].rows if len(parts) == 1 else torch.cat([p.rows for p in parts], dim=1)
        if all(isinstance(p._value, _LazyGram) for p in parts) and not per_example:
            return LowRankFactor(rows, n, _LazySum([p._value for p in parts], n))
        value = _sum([p.dense() for p in parts])
        return LowRankFactor(rows * n if per_example else rows, n, value * n if per_example else value / n)
    value = _sum([dense(p) for p in parts])
    return kind(value * n if per_example else value / n)


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


# ---- checkpoint form: a flat dict of named tensors ----------------------------------------------------------------
#: keys of the low-rank rows in a checkpoint's ``inverse_factors`` entries
_LEGACY_LOW_RANK_KEYS = {"A": ("rows", "n"), "G": ("g_rows", "g_n")}


def flatten(prefix: str, factors: dict[str, Factor], skip: dict[str, torch.Tensor] | None = None,
            rows: bool = True) -> dict[str, Any]:
    """``{prefix + stat: dense}`` for each factor whose dense value is not ``skip[stat]``, and with ``rows`` a
    low-rank factor's rows and count as ``prefix + stat + ".rows"`` / ``".n"`` (always: they describe it)."""
    skip = skip or {}
    out: dict[str, Any] = {}
    for stat, factor in factors.items():
        if factor.dense() is not skip.get(stat):
            out[prefix + stat] = factor.dense()
        if rows and isinstance(factor, LowRankFactor):
            out[f"{prefix}{stat}.rows"], out[f"{prefix}{stat}.n"] = factor.rows, factor.n
    return out


def unflatten(prefix: str, flat: dict[str, Any], base: dict[str, Factor], kinds: dict[str, type[DenseFactor]],
              device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Factor]:
    """Inverse of :func:`flatten`: ``base`` (e.g. the current factors) with the saved ones in their place, on
    ``device`` (and in ``dtype``, if given)."""
    out = dict(base)
    for stat, kind in kinds.items():
        saved, rows = flat.get(prefix + stat), flat.get(f"{prefix}{stat}.rows")
        if saved is None and rows is None:
            continue
        value = saved.to(device=device, dtype=dtype or saved.dtype) if saved is not None else base[stat].dense()
        out[stat] = kind(value) if rows is None else LowRankFactor(rows.to(device), int(flat[f"{prefix}{stat}.n"]),
                                                                      value)
    return out


def nested_inverse_keys(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The ``prefix`` keys of a flat state as a checkpoint's ``inverse_factors`` entry (``{stat: tensor}``, the
    low-rank rows of ``A`` under ``rows``/``n`` and of ``G`` under ``g_rows``/``g_n``)."""
    out = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        stat, _, field = key[len(prefix):].partition(".")
        if not field:
            out[stat] = value
        elif stat in _LEGACY_LOW_RANK_KEYS:
            out[_LEGACY_LOW_RANK_KEYS[stat][0 if field == "rows" else 1]] = value
        else:
            out[f"{stat}.{field}"] = value
    return out


def legacy_inverse_keys(saved: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A checkpoint's ``inverse_factors`` entry as flat keys (the inverse of :func:`nested_inverse_keys`)."""
    out = {}
    for key, value in saved.items():
        stat = next((s for s, keys in _LEGACY_LOW_RANK_KEYS.items() if key in keys), None)
        if stat is None or "." in key:
            out[prefix + key] = value
        else:
            out[f"{prefix}{stat}.{'rows' if key == _LEGACY_LOW_RANK_KEYS[stat][0] else 'n'}"] = value
    return out
