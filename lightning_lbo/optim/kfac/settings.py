"""The knobs of a K-FAC preconditioner, grouped into small frozen settings objects, each validated once.

* :class:`CurvatureSettings`: what is estimated (Fisher, likelihood, layers, precision);
* :class:`ScheduleSettings`: when statistics and inverses are refreshed and how factors are averaged;
* :class:`InverseSettings`: damping, inverse method and the update's shape (KL clip, L2).

:func:`describe` turns them into the rank-independent, picklable description that ranks compare
(:meth:`KFACPreconditioner.signature`): the list of settings is derived from the dataclass fields,
never written out by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac.blocks.linear import LinearVariant
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood, parse_enum
from lightning_lbo.optim.kfac.inverses import BlockInverse, InverseMethod, parse_inverse_method
from lightning_lbo.optim.kfac.stale import StaleStatistics

FloatSchedule = float | Callable[[int], float]
IntSchedule = int | Callable[[int], int]


def resolve(value: Any, step: int) -> Any:
    """A setting that may be a schedule ``step -> value``, at ``step``."""
    return value(step) if callable(value) else value


@dataclass(frozen=True)
class CurvatureSettings:
    """What the curvature estimates (``pre.curvature``). Each field is an argument of
    :class:`~lightning_lbo.optim.kfac.KFACPreconditioner` (and ``KFAC``) and reads as ``pre.<field>``.

    Attributes:
        fisher: ``"empirical"`` or ``"mc"`` (one sampled label per example; see ``output_to_logits``).
        likelihood: for ``fisher="mc"``: ``"categorical"`` (default; logits ``[N, C, *]``) or ``"gaussian"``;
            passing it with the empirical Fisher (which uses the training loss) raises ``ValueError``.
        output_to_logits: maps the root module's forward output to the logits (e.g. ``lambda o: o[0]``).
        linear_variant: :class:`LinearVariant` (or ``"expand"`` / ``"reduce"``) for Linear inputs ``[N, T, in]``.
        factor_dtype: dtype of the factors; ``None``: fp64 for a model with fp64 weights, else fp32, except
            for blocks whose inverse damps exactly (eigen, embeddings, unit-wise below damping 1e-3): fp64.
        exclude: modules, their qualified names or module types to leave to the plain update (e.g.
            ``[model.fc]``, ``["fc"]``, ``nn.Embedding``); a module or name not in the bound model raises.
        classes_dim: for ``fisher="mc"`` with categorical logits: their classes axis (``1`` for
            ``[N, C, *]``, ``-1`` for ``[N, T, V]``); ``None`` (default): the module's
            ``logits_classes_dim`` attribute if it declares one (``lightning_lbo.lm.GPT`` does), else ``1``.
    """

    fisher: Fisher = Fisher.EMPIRICAL
    likelihood: Likelihood | None = None  # None: categorical (passing one with the empirical Fisher raises)
    output_to_logits: Callable[[Any], torch.Tensor] | None = None
    linear_variant: LinearVariant = LinearVariant.EXPAND
    factor_dtype: torch.dtype | None = None
    exclude: tuple[nn.Module | str | type, ...] = ()
    classes_dim: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fisher", parse_enum(Fisher, self.fisher, "fisher"))
        if self.likelihood is not None and self.fisher is Fisher.EMPIRICAL:
            raise ValueError(f"likelihood={self.likelihood!r} has no effect with fisher='empirical' (the output "
                             "statistics come from the training loss); pass fisher='mc' to sample labels from it, "
                             "or drop likelihood.")
        likelihood = Likelihood.CATEGORICAL.value if self.likelihood is None else self.likelihood
        object.__setattr__(self, "likelihood", parse_enum(Likelihood, likelihood, "likelihood"))
        object.__setattr__(self, "linear_variant", LinearVariant.parse(self.linear_variant))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for entry in self.exclude:
            if not (isinstance(entry, (nn.Module, str)) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
                raise TypeError(f"Invalid exclude entry {entry!r}; use modules (model.fc), qualified module names "
                                "('fc', 'encoder.0') or module types (nn.Embedding).")
        if self.factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"Invalid factor_dtype: {self.factor_dtype}; use torch.float32, torch.float64 or None "
                             "(the model's precision).")


@dataclass(frozen=True)
class ScheduleSettings:
    """When statistics and inverses are refreshed, and the running average of factors (``pre.schedule``).

    Attributes:
        factor_update_interval / inverse_update_interval: steps between refreshes (int or ``step -> int``).
        factor_decay: weight of a new statistic in the running average of factors,
            ``factor <- (1 - factor_decay) * factor + factor_decay * new``; ``1.0`` (default) keeps fresh
            statistics (Osawa et al., 32K); ``0.05`` averages over about 20 refreshes.
        stale_statistics: a :class:`StaleStatistics` policy (per-statistic adaptive intervals) or ``None``.
    """

    factor_update_interval: IntSchedule = 10
    inverse_update_interval: IntSchedule = 10
    factor_decay: float = 1.0
    stale_statistics: StaleStatistics | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.factor_decay <= 1.0:
            raise ValueError(f"Invalid factor_decay: {self.factor_decay}; use a value in (0, 1] (1 = fresh "
                             "statistics).")
        for name in ("factor_update_interval", "inverse_update_interval"):
            value = getattr(self, name)
            if not callable(value) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Invalid {name}: {value!r}; use a positive int or a callable step -> int.")
        if self.stale_statistics is not None and not isinstance(self.stale_statistics, StaleStatistics):
            raise TypeError("stale_statistics must be a StaleStatistics policy, got "
                            f"{type(self.stale_statistics).__name__}.")

    def factor_interval(self, step: int) -> int:
        """Steps from a refresh at ``step`` to the next one of a statistic (without stale statistics)."""
        return max(1, int(resolve(self.factor_update_interval, step)))

    def inverse_due(self, step: int) -> bool:
        """Whether ``step`` is an inverse-update step."""
        return step % max(1, int(resolve(self.inverse_update_interval, step))) == 0


@dataclass(frozen=True)
class InverseSettings:
    """Damping and inverse method, and the shape of the update (KL clip, L2 folded in) (``pre.inverses``).

    Attributes:
        damping: Tikhonov damping ``lambda``, a float or ``step -> float``.
        inverse_method: ``"cholesky"`` (factored Tikhonov, fastest) or ``"eigen"`` (exact damping).
        low_rank_inverse: with fresh statistics, the cholesky method and one process, apply
            ``(A + delta I)^{-1}`` through the Woodbury identity when a batch has fewer rows than half of ``d``.
        kl_clip: scale the update so that ``lr^2 * sum <P, grad>`` is at most ``kl_clip``; ``None`` off.
        l2: L2 folded in: ``l2 * w`` is added to each preconditioned gradient and the damping becomes
            ``max(damping, l2)``.
    """

    damping: FloatSchedule = 1e-3
    inverse_method: InverseMethod = InverseMethod.CHOLESKY
    low_rank_inverse: bool = True
    kl_clip: float | None = 1e-3
    l2: float = 0.0

    def __post_init__(self) -> None:
        if not callable(self.damping) and not 0 < self.damping < math.inf:
            raise ValueError(f"Invalid damping: {self.damping}; use a positive finite float or a callable step -> "
                             "float (an infinite damping turns K-FAC into plain SGD scaled by 1/damping).")
        object.__setattr__(self, "inverse_method", parse_inverse_method(self.inverse_method))
        if self.kl_clip is not None and not self.kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {self.kl_clip}; use a positive float or None to disable.")
        if not self.l2 >= 0:
            raise ValueError(f"Invalid l2: {self.l2}; use a non-negative float.")

    def damping_at(self, step: int) -> float:
        """The damping in use at ``step``: ``max(damping(step), l2)``. A schedule's value is checked each time
        (a host float: the check costs no sync)."""
        damping = float(resolve(self.damping, step))
        if callable(self.damping) and not 0 < damping < math.inf:
            raise ValueError(f"damping({step}) returned {damping}; a damping schedule must return positive finite "
                             "floats.")
        return max(damping, self.l2)

    def needs_fp64_factors(self, method: type[BlockInverse]) -> bool:
        """Whether factors inverted by ``method`` (a block's inverse class) are held in fp64 when the user left
        the precision to K-FAC: an exactly damped inverse whose (fixed, or scheduled) damping is below where
        fp32 rounding of the factors stays negligible."""
        return method.exact_damping and (callable(self.damping) or self.damping < method.fp32_factors_from)

    def warn_fp32_eigen(self, factor_dtype: torch.dtype, stacklevel: int) -> None:
        """Warn that fp32 factors chosen by the user cannot carry an eigen-damping below 1e-3."""
        damping = self.damping
        if (self.inverse_method is InverseMethod.EIGEN and factor_dtype == torch.float32 and not callable(damping)
                and damping < 1e-3):
            warnings.warn(f"inverse_method='eigen' with damping {damping:g} < 1e-3 and fp32 factors: the "
                          "factors' rounding (~1e-7 of their norm) exceeds the damping; pass "
                          "factor_dtype=torch.float64.", UserWarning, stacklevel=stacklevel + 1)


SETTINGS_TYPES = (CurvatureSettings, ScheduleSettings, InverseSettings)
#: the attribute of each settings object on a preconditioner (:func:`expose_settings`)
SETTINGS_GROUPS = {"curvature": CurvatureSettings, "schedule": ScheduleSettings, "inverses": InverseSettings}


def model_factor_dtype(module: nn.Module) -> torch.dtype:
    """The factors' default precision for ``module``: fp64 for a model with fp64 weights, else fp32."""
    weights = [p for p in module.parameters() if p.is_floating_point()]
    return torch.float64 if weights and weights[0].dtype == torch.float64 else torch.float32


def expose_settings(cls: type) -> type:
    """Class decorator: each field of the :data:`SETTINGS_GROUPS` objects becomes a read-only property of ``cls``
    under its constructor name (``pre.damping`` reads ``pre.inverses.damping``), unless ``cls`` defines it."""
    for group, settings_type in SETTINGS_GROUPS.items():
        for field in dataclasses.fields(settings_type):
            if field.name not in vars(cls):
                setattr(cls, field.name, property(
                    lambda self, group=group, name=field.name: getattr(getattr(self, group), name),
                    doc=f"``{group}.{field.name}`` (read only)."))
    return cls


def signature_settings(owner: Any) -> dict[str, Any]:
    """``{"<group>.<field>": description}`` of every setting of ``owner``'s settings objects (:func:`describe`)."""
    return {f"{group}.{key}": value for group in SETTINGS_GROUPS
            for key, value in describe(getattr(owner, group)).items()}


def check_keywords(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise ``TypeError`` naming ``owner``, each unknown keyword (with a close match) and the valid names."""
    accepted = sorted(accepted)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, accepted, 1))
                             else "") for k in unknown]
        raise TypeError(f"{owner} got unexpected keyword argument(s) {', '.join(hints)}. "
                        f"Valid: {', '.join(accepted)}.")


def describe(value: Any) -> Any:
    """A rank-independent, picklable description of a setting: callables by qualified name, enums by value,
    dataclasses field by field, modules by type and structure (never by id)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, type):
        return value.__qualname__
    if dataclasses.is_dataclass(value):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [describe(v) for v in value]
    if isinstance(value, nn.Module):
        return f"{type(value).__qualname__} {sum(p.numel() for p in value.parameters())} parameters"
    if callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return repr(value)
