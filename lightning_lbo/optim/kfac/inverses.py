"""Damped inverses of curvature blocks: one class per method, and the numerical fallback ladder.

Every method is a :class:`BlockInverse` with ``from_factors(factors, damping, dtype)`` (the inverse
and an on-device "ok" flag), ``apply(grad, damping)`` (the preconditioned gradient, fp32, same layout)
and ``tensors()`` (what an owner rank broadcasts; ``receiver(...)`` builds empty buffers of the same
layout on the other ranks).

* :class:`CholeskyKronecker` (``inverse_method="cholesky"``): factored Tikhonov damping
  (Martens & Grosse 2015, section 6.3),

  .. math:: (A + \\pi\\sqrt{\\lambda} I)^{-1} \\otimes (G + \\frac{\\sqrt{\\lambda}}{\\pi} I)^{-1},
     \\qquad \\pi = \\sqrt{\\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}},

  each inverse through a Cholesky factorisation; damping fixed at inversion time.
* :class:`~lightning_lbo.optim.kfac.inversion.WoodburyKronecker` (:mod:`.inversion`): the same damped
  system when ``A = U^T U / n`` (or ``G``, or both) has fewer rows ``r`` than half its size (fresh
  statistics, one process):
  :math:`(U^T U / n + \\delta I)^{-1} = \\frac{1}{\\delta}(I - U^T (n\\delta I + U U^T)^{-1} U)`,
  ``O(d_G d_A r)`` per step instead of ``O(d_G d_A^2)`` (``O(d_G^2 d_A)`` for ``G``).
* :class:`EigenKronecker` (``inverse_method="eigen"``): ``A = Q_A diag(d_A) Q_A^T`` (same for G) and
  the exact damping ``1 / (d_G d_A^T + \\lambda)`` applied at every step with the current damping.
* :class:`DiagonalKronecker`: exact damping with a diagonal ``A`` (embeddings).
* :class:`UnitWise`: ``(F_u + \\lambda I)^{-1}`` per unit (BatchNorm/LayerNorm, SP-NGD).

Precision. In fp32, directions of the gradient the factors barely see are amplified by ``1 /
damping`` together with the rounding error of the projection onto them (``~1e-7 |grad|``), so each
method computes, stores and applies its inverse in fp64 below a damping of ``precise_below``
(1e-3 for the Cholesky, Woodbury and unit-wise methods; always for the eigen methods, whose fp32
eigenvectors alone cost 1e-4). The relative error against a dense fp64 solve then stays below 1e-4
from damping 1e-2 to 1e-6 (tested). The methods with ``exact_damping`` (eigen, diagonal, unit-wise)
add the damping to the factors' eigenvalues, and an fp32 factor is rounded by ``~1e-7 |A|``, more
than a damping below 1e-3: their blocks hold fp64 factors by default (``factor_dtype=None``).
A block whose factorisation fails or is not finite is retried in fp64, then in fp64 on the PSD
projection of its factors, then with 10x and 100x the damping, and finally replaced by the identity
(the plain gradient for that layer) with a warning. The projection rung exists because a factor
accumulated in fp32 is symmetric positive semi-definite only up to its rounding, ``~1e-7 |A|``: a
damping below that (a huge, low-rank ``G`` from a tiny batch through BatchNorm) leaves the damped
factor indefinite in any precision. Its eigenvalues are then clamped at zero before damping
(``Q diag(1 / (max(d, 0) + delta)) Q^T``), the damped inverse of the nearest PSD factor, provided
the negative ones are rounding (above ``-1e-2`` times the largest: a bf16-reduced factor's): a factor more negative than
that is broken, not rounded, and goes on down the ladder.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch


class InverseMethod(str, Enum):
    CHOLESKY = "cholesky"
    EIGEN = "eigen"


def parse_inverse_method(method: str) -> InverseMethod:
    try:
        return InverseMethod(method)
    except ValueError:
        raise ValueError(f"Invalid inverse_method: {method!r}. Supported: "
                         f"{tuple(m.value for m in InverseMethod)}.") from None


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)


def pi_factor(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``pi = sqrt((tr A / d_A) / (tr G / d_G))`` per group, ``[groups, 1, 1]`` (1 where undefined)."""
    return _pi(_mean_diagonal(A), _mean_diagonal(G))


def _mean_diagonal(factor: torch.Tensor) -> torch.Tensor:
    """``tr(F) / d`` per group of ``[groups, d, d]``."""
    return factor.diagonal(dim1=1, dim2=2).mean(1)


def _pi(ta: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    pi = torch.sqrt(ta / tg)
    pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
    return pi.view(-1, 1, 1)


def _cholesky_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of SPD ``m`` and an ok flag (device tensor; no sync).

    A matrix whose factorisation fails (``info > 0``: singular at this precision, e.g. a huge
    low-rank ``G`` next to a damping below its rounding) gets the flag False, never an exception:
    ``cholesky_inverse`` raises on the zero pivot a failed factor can hold, so such factors are
    swapped for the identity first (on the device) and the caller's fallback ladder takes over.
    """
    chol, info = torch.linalg.cholesky_ex(m)
    failed = (info != 0).reshape(*info.shape, 1, 1)
    inv = torch.cholesky_inverse(torch.where(failed, _eye_like(chol), chol))
    ok = (info == 0).all() & torch.isfinite(inv).all()
    return inv, ok


#: negative eigenvalues down to this fraction of the largest one are rounding (fp32 factors: ~1e-7 per
#: accumulation; factors all-reduced in bf16 (``reduce_dtype``): down to -1.8e-3 measured over 10,000 random
#: factors, benchmarks/inverse_robustness.py, ~5x headroom); below it a factor is not PSD and the projection
#: is refused
ROUNDING_TOLERANCE = 1e-2


def _projected_inverse(m: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(m) + shift I)^{-1}`` with ``P`` the projection onto PSD matrices (eigenvalues clamped at 0),
    and an ok flag, False for a non-finite ``m`` or one more negative than rounding explains;
    ``m: [groups, d, d]``, ``shift: [groups, 1, 1]``, positive."""
    try:
        d, q = torch.linalg.eigh(m)
    except RuntimeError:  # "failed to converge" (non-finite input)
        return _eye_like(m).clone(), torch.zeros((), dtype=torch.bool, device=m.device)
    inv = torch.matmul(q / (d.clamp_min(0) + shift.reshape(-1, 1)).unsqueeze(1), q.transpose(1, 2))
    rounding = (d[:, 0] >= -ROUNDING_TOLERANCE * d.abs().amax(1)).all()
    return inv, _all_finite(inv) & rounding


def _damped_inverse(m: torch.Tensor, shift: torch.Tensor, psd_projection: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m + shift I)^{-1}`` by Cholesky, or of ``m``'s PSD projection by eigh (the fallback rung)."""
    if psd_projection:
        return _projected_inverse(m, shift)
    return _cholesky_inverse(m + shift * _eye_like(m))


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


class BlockInverse:
    """Base of the inverse methods: a named set of tensors and how to apply them."""

    names: tuple[str, ...] = ()
    #: the tensors (by name) that are batches of symmetric matrices: broadcast as packed triangles
    symmetric: frozenset[str] = frozenset()
    #: dampings below this are inverted and applied in fp64 (see the module docstring)
    precise_below = 1e-3
    #: the damping is added to the factors' eigenvalues themselves (not a factored ``sqrt(lambda)`` per
    #: factor), so a factor rounded to fp32 is off by more than a small damping: held in fp64 by default
    exact_damping = False
    #: with ``exact_damping``: the fixed damping from which fp32 factors are precise enough (1e-4 of a
    #: dense fp64 solve), so that the default factor dtype stays fp32 there (inf: always fp64)
    fp32_factors_from = float("inf")

    def __init__(self, **tensors: torch.Tensor) -> None:
        # Contiguous, so that an owner's inverse and a broadcast copy (received into contiguous buffers)
        # run the same kernels: equal values in another memory layout round differently in bmm, and
        # data-parallel ranks would drift apart by an ulp per step.
        self.data = {name: t.contiguous() for name, t in tensors.items()}

    @classmethod
    def storage_dtype(cls, damping: float, factor_dtype: torch.dtype) -> torch.dtype:
        """The dtype this inverse is stored and applied in: fp64 for small damping or fp64 factors."""
        return torch.float64 if damping < cls.precise_below or factor_dtype == torch.float64 else torch.float32

    @classmethod
    def from_factors(cls, factors: dict[str, torch.Tensor], damping: float, dtype: torch.dtype,
                     out_dtype: torch.dtype, psd_projection: bool = False) -> tuple[BlockInverse, torch.Tensor]:
        """The damped inverse computed in ``dtype``, stored in ``out_dtype``, and an ok flag (no sync).

        ``psd_projection``: invert the damped PSD projection of each factor (eigenvalues clamped at
        0; the fallback for factors indefinite by their rounding). Methods that clamp eigenvalues
        anyway (eigen, diagonal, unit-wise) ignore it.
        """
        raise NotImplementedError

    @classmethod
    def identity(cls, factors: dict[str, torch.Tensor], out_dtype: torch.dtype) -> BlockInverse:
        """An inverse of this layout that leaves the gradient unchanged (the plain-gradient fallback)."""
        raise NotImplementedError

    @classmethod
    def receiver(cls, factors: dict[str, torch.Tensor], out_dtype: torch.dtype) -> BlockInverse:
        """Empty buffers of this layout, to receive a broadcast inverse."""
        template = cls.identity(factors, out_dtype)
        return cls(**{k: torch.empty(v.shape, dtype=v.dtype, device=v.device) for k, v in template.data.items()})

    def tensors(self) -> list[torch.Tensor]:
        """The tensors an owner broadcasts (in a fixed order)."""
        return [self.data[k] for k in self.names]

    def symmetric_flags(self) -> list[bool]:
        """For each of :meth:`tensors`: whether it is a batch of symmetric matrices."""
        return [k in self.symmetric for k in self.names]

    def apply(self, grad: torch.Tensor, damping: float) -> torch.Tensor:
        """The preconditioned gradient (layout and dtype of ``grad``)."""
        raise NotImplementedError

    def apply_unscaled(self, grad: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(P', s)`` with the preconditioned gradient ``P = s * P'`` (``s`` a 0-d tensor, or ``None`` for 1).

        The caller folds ``s`` into a multiplication it makes anyway (the KL clip, the write-back), which
        saves a pass over a wide layer's gradient.
        """
        return self.apply(grad, damping), None

    def _cast(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(self.data[self.names[0]].dtype)


class CholeskyKronecker(BlockInverse):
    """Factored Tikhonov damping, ``P = G_inv @ grad @ A_inv`` (grad ``[groups, d_g, d_a]``)."""

    names = ("A_inv", "G_inv")
    symmetric = frozenset(names)

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        A, G = factors["A"].to(dtype), factors["G"].to(dtype)
        pi, root = pi_factor(A, G), damping ** 0.5
        a_inv, ok_a = _damped_inverse(A, pi * root, psd_projection)
        g_inv, ok_g = _damped_inverse(G, root / pi, psd_projection)
        return cls(A_inv=a_inv.to(out_dtype), G_inv=g_inv.to(out_dtype)), ok_a & ok_g

    @classmethod
    def identity(cls, factors, out_dtype):
        A, G = factors["A"], factors["G"]
        return cls(A_inv=_eye_like(A).to(out_dtype).clone(), G_inv=_eye_like(G).to(out_dtype).clone())

    def apply(self, grad, damping):
        return torch.bmm(torch.bmm(self.data["G_inv"], self._cast(grad)), self.data["A_inv"]).to(grad.dtype)


class EigenKronecker(BlockInverse):
    """Exact damping: ``P = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + mask * lambda)] Q_A^T``."""

    names = ("QA", "dA", "QG", "dG", "mask")
    precise_below = float("inf")
    exact_damping = True

    @staticmethod
    def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, q = torch.linalg.eigh(m)
        return d.clamp_min(0), q  # factors are PSD: negative eigenvalues are round-off

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        try:
            dA, QA = cls._eigh(factors["A"].to(dtype))
            dG, QG = cls._eigh(factors["G"].to(dtype))
        except RuntimeError:  # "failed to converge"
            return cls.identity(factors, out_dtype), torch.zeros((), dtype=torch.bool, device=factors["G"].device)
        ok = _all_finite(QA, QG, dA, dG)
        mask = torch.ones((), dtype=out_dtype, device=QA.device)
        return cls(QA=QA.to(out_dtype), dA=dA.to(out_dtype), QG=QG.to(out_dtype), dG=dG.to(out_dtype),
                   mask=mask), ok

    @classmethod
    def identity(cls, factors, out_dtype):
        # Q = I, unit eigenvalues and mask = 0 (no damping term): 1 / (dG dA^T + mask * lambda) = 1.
        A, G = factors["A"], factors["G"]
        return cls(QA=_eye_like(A).to(out_dtype).clone(), dA=A.new_ones(A.shape[:2], dtype=out_dtype),
                   QG=_eye_like(G).to(out_dtype).clone(), dG=G.new_ones(G.shape[:2], dtype=out_dtype),
                   mask=A.new_zeros((), dtype=out_dtype))

    def apply(self, grad, damping):
        d = self.data
        QA, QG = d["QA"], d["QG"]
        v = torch.bmm(torch.bmm(QG.transpose(1, 2), self._cast(grad)), QA)
        v = v / (d["dG"].unsqueeze(2) * d["dA"].unsqueeze(1) + damping * d["mask"])
        return torch.bmm(torch.bmm(QG, v), QA.transpose(1, 2)).to(grad.dtype)


class DiagonalKronecker(EigenKronecker):
    """Exact damping with a diagonal ``A`` (``[1, d_A]``, its own eigenbasis): ``Q_A = I``."""

    names = ("dA", "QG", "dG", "mask")

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        try:
            dG, QG = cls._eigh(factors["G"].to(dtype))
        except RuntimeError:
            return cls.identity(factors, out_dtype), torch.zeros((), dtype=torch.bool, device=factors["G"].device)
        dA = factors["A"].to(dtype).clamp_min(0)
        ok = _all_finite(dA, QG, dG)
        mask = torch.ones((), dtype=out_dtype, device=QG.device)
        return cls(dA=dA.to(out_dtype), QG=QG.to(out_dtype), dG=dG.to(out_dtype), mask=mask), ok

    @classmethod
    def identity(cls, factors, out_dtype):
        A, G = factors["A"], factors["G"]
        return cls(dA=torch.ones_like(A, dtype=out_dtype), QG=_eye_like(G).to(out_dtype).clone(),
                   dG=G.new_ones(G.shape[:2], dtype=out_dtype), mask=A.new_zeros((), dtype=out_dtype))

    def apply(self, grad, damping):
        d = self.data
        QG = d["QG"]
        v = torch.bmm(QG.transpose(1, 2), self._cast(grad))
        v = v / (d["dG"].unsqueeze(2) * d["dA"].unsqueeze(1) + damping * d["mask"])
        return torch.bmm(QG, v).to(grad.dtype)


class UnitWise(BlockInverse):
    """``P_u = (F_u + lambda I)^{-1} grad_u`` for every unit (grad ``[units, k]``), in closed form.

    With ``F_u = [[a, b], [b, c]]`` (PSD) the damped inverse is the adjugate over the determinant,

    .. math:: (F_u + \\lambda I)^{-1} = \\frac{1}{\\det}\\begin{pmatrix} c + \\lambda & -b \\\\ -b & a + \\lambda
       \\end{pmatrix}, \\qquad \\det = \\max(ac - b^2, 0) + \\lambda (a + c) + \\lambda^2 > 0,

    (``1 / (a + lambda)`` for ``k = 1``), computed in fp64 whatever ``dtype``: a unit whose
    per-example gradients are collinear (a BatchNorm channel seeing two values) has ``ac = b^2`` up to
    rounding, and in fp32 that cancellation exceeds ``lambda (a + c)`` (a Cholesky then fails, and the
    adjugate's determinant can be negative). Clamping the Gram determinant, which is non-negative for a
    PSD ``F``, keeps ``det >= lambda (a + c) + lambda^2``: the inverse exists for any finite ``F``.
    The ``units x 4`` numbers cost nothing next to the Kronecker blocks.
    """

    names = ("F_inv",)
    symmetric = frozenset(names)
    exact_damping = True
    # the statistic is activation-sized (BatchNorm inputs): fp64 would double a refresh's memory traffic,
    # and the fp32 2x2 factors are within 1e-4 of fp64 from damping 1e-3 up (test_kfac_default_precision)
    fp32_factors_from = 1e-3

    @classmethod
    def from_factors(cls, factors, damping, dtype, out_dtype, psd_projection=False):
        F = factors["F"].to(torch.float64)
        a = F[:, 0, 0].clamp_min(0)
        if F.shape[-1] == 1:
            inv = (1.0 / (a + damping)).view(-1, 1, 1)
            return cls(F_inv=inv.to(out_dtype)), _all_finite(inv)
        c, b = F[:, 1, 1].clamp_min(0), 0.5 * (F[:, 0, 1] + F[:, 1, 0])
        det = (a * c - b * b).clamp_min(0) + damping * (a + c) + damping * damping
        adjugate = torch.stack([torch.stack([c + damping, -b], 1), torch.stack([-b, a + damping], 1)], 1)
        inv = adjugate / det.view(-1, 1, 1)
        ok = _all_finite(inv) & (det > 0).all()
        return cls(F_inv=inv.to(out_dtype)), ok

    @classmethod
    def identity(cls, factors, out_dtype):
        return cls(F_inv=_eye_like(factors["F"]).to(out_dtype).clone())

    def apply(self, grad, damping):
        return torch.bmm(self.data["F_inv"], self._cast(grad).unsqueeze(2)).squeeze(2).to(grad.dtype)


_MOVED = ("WoodburyKronecker", "USED_COLUMNS_AT_MOST", "InverseJob", "method_for", "invert_with_fallback")


def __getattr__(name: str) -> Any:
    """The low-rank method and the fallback ladder live in :mod:`.inversion` (which imports this module)."""
    if name in _MOVED:
        from lightning_lbo.optim.kfac import inversion

        return getattr(inversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
