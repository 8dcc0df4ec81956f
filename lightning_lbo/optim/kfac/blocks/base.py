"""The curvature block base: one object per preconditioned layer, owning its factors, schedule and inverse.

Scaling convention (one for every block, every batch size and every world size)
-------------------------------------------------------------------------------
The training loss is the **mean over the batch** (leading dimension) of per-example losses, so an
output gradient ``dL/dy_i`` is ``1/N`` times the per-example gradient. Statistics are built from
per-example quantities, ``g_i = N * dL/dy_i``, so that the Fisher block ``F ~ A (x) G`` estimates
``E_i[grad_i grad_i^T]`` of a *single example* and damping means the same at every batch size:

.. math::

    A = \\frac{1}{N}\\sum_i \\sum_{t=1}^{T} \\bar a_{i,t} \\bar a_{i,t}^T, \\qquad
    G = \\frac{1}{N}\\sum_i \\frac{1}{T}\\sum_{t=1}^{T} g_{i,t} g_{i,t}^T,

where ``t`` runs over the ``T`` positions sharing the weight (conv output locations, sequence
positions of an N-D Linear in the "expand" variant, **and the uses of a module called several times
in one forward**: tied weights, a shared block) and ``\\bar a = [a, 1]`` folds the bias in. This is
the KFC convention of Grosse & Martens (2016): the positional sum sits in ``A``, the positional mean
in ``G``; for a plain Linear layer ``T = 1``. The "reduce" variant for N-D Linear inputs uses
``a_i = mean_t a_{i,t}`` and ``g_i = sum_t g_{i,t}`` (Eschenhagen et al. 2023). Calls of a layer
between two backward passes are uses of one micro-batch (so ``N`` counts the examples once);
micro-batches separated by a backward are more examples (gradient accumulation).

Blocks compute **sums over examples** (:meth:`CurvatureBlock.input_statistics`,
:meth:`CurvatureBlock.output_statistic`); :meth:`CurvatureBlock.statistics` divides by the number of
examples of the whole (possibly accumulated) batch and applies the per-example factor ``N``
(:func:`~lightning_lbo.optim.kfac.factors.total`).

Tensor layouts: Kronecker factors are batched over groups, ``A: [groups, d_a, d_a]``,
``G: [groups, d_g, d_g]``; a layer's gradient as a matrix is ``[groups, d_g, d_a]``. An embedding's
``A`` is diagonal and stored as its diagonal ``[1, num_embeddings]``. Unit-wise blocks (BatchNorm,
LayerNorm; SP-NGD, Osawa et al. 2020) hold one ``k x k`` Fisher per unit, ``F: [units, k, k]`` with
``k = 2`` for (gamma, beta), 1 without a bias.

State and verbs
---------------
A block's state is private; the preconditioner drives it only through verbs: :meth:`capture_rows`
(plan the coming capture), :meth:`statistics` and :meth:`commit` (a refresh), :meth:`reschedule`,
:meth:`inverse_job` and :meth:`install` (an inversion), :meth:`state` / :meth:`check_state` /
:meth:`restore` (checkpoints, a flat dict of named tensors and numbers). Read-only properties expose
what others read (``factors``, ``inverse``, ``owner``, ``interval``, ...).

Adding a block type
-------------------
Subclass :class:`CurvatureBlock` (or :class:`~lightning_lbo.optim.kfac.blocks.KroneckerBlock`),
implement the methods marked *contract*, and map a module type to it, for one preconditioner
(``KFACPreconditioner(model, block_types={MyLayer: MyBlock})``) or globally (:func:`register_block`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac import inversion
from lightning_lbo.optim.kfac.stale import StaleStatistics


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision gradients are preconditioned in: fp64 stays fp64, anything else is fp32."""
    return t if t.dtype == torch.float64 else t.float()


def _gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x^T x`` batched: ``[groups, rows, d] -> [groups, d, d]`` in ``dtype``."""
    x = x.to(dtype)
    return torch.bmm(x.transpose(1, 2), x)


def _gram_with_ones(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[x, 1]^T [x, 1]`` without materialising the ones column: ``[g, rows, d] -> [g, d+1, d+1]``."""
    x = x.to(dtype)
    return _bordered(torch.bmm(x.transpose(1, 2), x), x.sum(1), x.shape[1])


def _bordered(gram: torch.Tensor, col: torch.Tensor, rows: int) -> torch.Tensor:
    """``[[gram, col], [col^T, rows]]``: the Gram of ``[x, 1]`` from that of ``x`` and its column sums."""
    g, d, _ = gram.shape
    out = gram.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = gram
    out[:, :d, d] = col
    out[:, d, :d] = col
    out[:, d, d] = rows
    return out


class BlockUse(Protocol):
    """The calls of one module a block hooks (a block of one module is its own use; :meth:`CurvatureBlock.uses`)."""

    output_stat: str

    def hook_io(self, inputs: tuple, kwargs: dict[str, Any], output: Any) -> tuple[Any, int, Any]:
        """The input for :meth:`input_statistics`, the number of examples, and the output whose gradient counts."""

    def input_statistics(self, x: Any, due: set[str]) -> tuple[dict[str, Any], Any]:
        """Sums over examples of the due input statistics (tensors or low-rank parts), and a backward context."""

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        """Sum over examples of the output statistic of the unscaled ``dL/dy``."""

    def symmetric(self, stat: str) -> bool:
        """Whether the statistic is a (batch of) symmetric matrices."""


class Restored(NamedTuple):
    """What a checkpoint says the inverse in use was built from (rebuilt at the first step after loading)."""

    source: dict[str, fac.Factor]
    damping: float
    stale: bool  # the source is older than the factors (refreshed since the inversion)
    versions: dict[str, int]  # the factor versions at load


class CurvatureBlock:
    """One layer's curvature: statistics being captured, factors, their versions and the inverse.

    Contract of a subclass: ``stat_names`` (``input_stats`` computed from the layer input in the
    forward, ``output_stat`` from the output gradient), :meth:`input_statistics`,
    :meth:`output_statistic`, :meth:`grad_matrix`, :meth:`set_grad`, :meth:`param_matrix`,
    :meth:`factor_shapes`, :meth:`cost` and :meth:`inverse_type`.
    """

    stat_names: tuple[str, ...] = ()
    input_stats: tuple[str, ...] = ()
    output_stat: str = ""

    def __init__(self, module: nn.Module, name: str, factor_dtype: torch.dtype = torch.float32) -> None:
        self.module = module
        self.name = name
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = module.bias if getattr(module, "bias", None) is not None else None
        self._factor_dtype = factor_dtype
        self._factors: dict[str, fac.Factor] = {}
        self._versions = {s: 0 for s in self.stat_names}  # bumped whenever a factor changes
        self._inverse: inv.BlockInverse | None = None
        self._inverse_versions: dict[str, int] | None = None  # the factor versions the inverse was built from
        self._inverse_source: dict[str, fac.Factor] | None = None
        self._inverse_damping: float | None = None
        self._restored: Restored | None = None
        self._owner: int | None = None
        self._interval = {s: 1 for s in self.stat_names}
        self._next_due = {s: 0 for s in self.stat_names}
        self._refreshes = {s: 0 for s in self.stat_names}
        # per statistic, on the device: has a finite estimate been committed (vs the identity placeholder)
        self._estimated = {s: torch.zeros((), dtype=torch.bool, device=self.weight.device) for s in self.stat_names}
        self._keep_rows = False  # the coming capture keeps low-rank rows (see capture_rows)
        self._defer_gram = False

    # ---- contract ----------------------------------------------------------------------------------------
    @classmethod
    def trainable(cls, module: nn.Module) -> bool:
        """Whether ``module`` has the trainable parameters this block type preconditions."""
        return isinstance(getattr(module, "weight", None), nn.Parameter)

    def hook_io(self, inputs: tuple, kwargs: dict[str, Any], output: Any) -> tuple[Any, int, Any]:
        """From one hooked call: the input passed to :meth:`input_statistics`, the number of examples,
        and the output tensor whose gradient feeds :meth:`output_statistic`."""
        x = inputs[0].detach()
        return x, x.shape[0], output

    def uses(self) -> list[tuple[nn.Module, BlockUse]]:
        """``(module, use)`` for each module the capture hooks; the first use counts the examples."""
        return [(self.module, self)]

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this block preconditions."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def description(self) -> str:
        """Rank-independent summary (type and factor sizes), compared across ranks and checkpoints."""
        return f"{type(self).__name__} {tuple(self.factor_shapes().values())}"

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each factor (checked on checkpoint load)."""
        raise NotImplementedError

    def cost(self) -> float:
        """Relative cost of inverting this block (``sum d^3``), for assigning inverse work to ranks."""
        raise NotImplementedError

    def input_statistics(self, x: torch.Tensor, due: set[str]) -> tuple[dict[str, Any], Any]:
        """Sums over the examples of ``x`` of the due input statistics, and a context for the backward."""
        raise NotImplementedError

    def output_statistic(self, grad: torch.Tensor, context: Any) -> torch.Tensor:
        """Sum over examples of the output-gradient statistic of the *unscaled* ``dL/dy`` (the caller scales)."""
        raise NotImplementedError

    def grad_matrix(self) -> torch.Tensor:
        """The gradient in the block's layout (fp32, fp64 for fp64 parameters)."""
        raise NotImplementedError

    def param_matrix(self) -> torch.Tensor:
        """The parameters in the layout of :meth:`grad_matrix` (for folding L2 in)."""
        raise NotImplementedError

    def set_grad(self, matrix: torch.Tensor) -> None:
        """Write a matrix in the :meth:`grad_matrix` layout back into ``.grad`` (in place)."""
        raise NotImplementedError

    def inverse_type(self, method: inv.InverseMethod) -> type[inv.BlockInverse]:
        """The inverse class this block uses with ``method`` (for dense factors)."""
        raise NotImplementedError

    @property
    def low_rank_capable(self) -> bool:
        """Whether the Woodbury inverse (rows of a factor kept at capture) applies to this block."""
        return False

    def symmetric(self, stat: str) -> bool:
        """Whether the statistic is a (batch of) symmetric matrices (else: a diagonal, stored as a vector)."""
        return True

    def factor_kind(self, stat: str) -> type[fac.DenseFactor]:
        """The factor type of a dense statistic: :class:`~.factors.DiagonalFactor` for the non-symmetric ones."""
        return fac.DenseFactor if self.symmetric(stat) else fac.DiagonalFactor

    def identity_factor(self, stat: str) -> torch.Tensor:
        """The factor used before the first finite estimate (the identity)."""
        shape = self.factor_shapes()[stat]
        return torch.eye(shape[-1], dtype=self.factor_dtype, device=self.weight.device).expand(shape).clone()

    def output_part(self, stat: torch.Tensor, grad: torch.Tensor) -> Any:
        """The captured output statistic ``stat`` of ``grad``, as a low-rank part when this block keeps rows."""
        return stat

    # ---- read-only state ------------------------------------------------------------------------------------
    @property
    def factor_dtype(self) -> torch.dtype:
        return self._factor_dtype

    def promote_factor_dtype(self, dtype: torch.dtype) -> None:
        """Hold the factors in ``dtype`` (before the first capture: the default precision of exact damping)."""
        self._factor_dtype = dtype

    @property
    def factors(self) -> dict[str, torch.Tensor]:
        """``{statistic: factor}``, dense (a deferred low-rank factor's Gram is built here, once)."""
        return {stat: factor.dense() for stat, factor in self._factors.items()}

    @property
    def stored(self) -> Mapping[str, fac.Factor]:
        """``{statistic: Factor}`` as stored (a low-rank factor may not have built its dense value)."""
        return MappingProxyType(self._factors)

    @property
    def versions(self) -> Mapping[str, int]:
        return MappingProxyType(self._versions)

    @property
    def inverse(self) -> inv.BlockInverse | None:
        return self._inverse

    @property
    def owner(self) -> int | None:
        """The rank that computes this block's inverse (``None`` before the first inversion)."""
        return self._owner

    @property
    def interval(self) -> Mapping[str, int]:
        return MappingProxyType(self._interval)

    @property
    def next_due(self) -> Mapping[str, int]:
        return MappingProxyType(self._next_due)

    @property
    def refreshes(self) -> Mapping[str, int]:
        return MappingProxyType(self._refreshes)

    @property
    def estimated(self) -> Mapping[str, torch.Tensor]:
        return MappingProxyType(self._estimated)

    @property
    def captured(self) -> bool:
        return len(self._factors) == len(self.stat_names)

    @property
    def inverse_is_current(self) -> bool:
        return self._inverse_versions == self._versions

    # ---- verbs: capture and refresh ---------------------------------------------------------------------------
    def set_factor(self, stat: str, value: torch.Tensor | fac.Factor) -> None:
        """Replace a factor (a tensor or a :class:`~.factors.Factor`) and bump its version (invalidates an
        inverse built from the old one)."""
        self._factors[stat] = value if isinstance(value, fac.Factor) else self.factor_kind(stat)(value)
        self._versions[stat] += 1

    def invalidate_inverse(self) -> None:
        """Recompute the inverse at the next step from the current factors, whatever the schedule (also instead
        of the one a checkpoint restored)."""
        self._owner, self._restored = None, None

    def release(self) -> None:
        """Hold no curvature (owner placement: another rank owns it); the schedule stays, as on every rank."""
        self._factors, self._inverse, self._inverse_source, self._restored = {}, None, None, None

    def curvature_tensors(self) -> list[torch.Tensor]:
        """Every curvature tensor this block holds: factors, inverse, and the factors it was built from."""
        held = [self._factors, self._inverse_source or {}] + ([self._restored.source] if self._restored else [])
        inverse = list(self._inverse.data.values()) if self._inverse is not None else []
        return [t for d in held for f in d.values() for t in fac.wire(f)] + inverse

    def due(self, step: int) -> set[str]:
        """The statistics to capture at ``step``."""
        return {s for s, due in self._next_due.items() if due <= step}

    def start_schedule(self, interval: int) -> None:
        self._interval = dict.fromkeys(self.stat_names, interval)

    def reschedule(self, stat: str, interval: int, step: int) -> None:
        """Refresh ``stat`` next at ``step + interval``."""
        self._interval[stat] = interval
        self._next_due[stat] = step + interval

    def retry(self, stat: str, step: int) -> None:
        """Refresh ``stat`` again at ``step + 1`` (it has no finite estimate yet), keeping its interval."""
        self._next_due[stat] = step + 1

    def capture_rows(self, keep: bool, defer: bool = False) -> None:
        """Plan the coming capture: keep the rows of statistics with few of them (a low-rank factor for the
        Woodbury inverse), and with ``defer`` build their Gram only if read."""
        self._keep_rows, self._defer_gram = keep and self.low_rank_capable, defer and keep and self.low_rank_capable

    def statistics(self, sums: dict[str, list[Any]], examples: int, per_example_output: bool
                   ) -> list[tuple[str, fac.Factor]]:
        """The new factors of a refresh from the captured sums of ``examples`` examples (the scaling convention
        above; ``per_example_output``: the output statistics are of ``dL/dy``, not of per-example gradients)."""
        n = max(examples, 1)
        return [(stat, fac.total(parts, n, per_example_output and stat not in self.input_stats,
                                 self.factor_kind(stat))) for stat, parts in sums.items()]

    def commit(self, stat: str, new: fac.Factor, ok: torch.Tensor, decay: float,
               track_change: bool = False) -> torch.Tensor | None:
        """Commit a refresh of ``stat``: the running average with weight ``decay`` where ``ok`` (0-d bool on the
        device), else the old factor. Returns the relative change (for stale statistics) if ``track_change``
        and a previous factor existed."""
        previous = self._factors.get(stat)
        change = None
        if track_change and previous is not None:
            change = StaleStatistics.relative_change(new.dense(), previous.dense())
        self.set_factor(stat, new.committed(previous, ok, decay, self._estimated[stat],
                                            partial(self.identity_factor, stat)))
        self._estimated[stat] = self._estimated[stat] | ok
        self._refreshes[stat] += 1
        return change

    # ---- verbs: inversion -----------------------------------------------------------------------------------
    def needs_inverse(self, due: bool) -> bool:
        """Whether to (re)compute the inverse now (``due``: an inverse-update step)."""
        restored = self._restored
        if restored is not None and due and (restored.stale or self._versions != restored.versions):
            # the checkpointed run re-inverts here (its inverse was older than its factors, or they were
            # refreshed since the checkpoint): invert the current factors, as it did
            self._restored = None
        return self.captured and (self._owner is None or (due and not self.inverse_is_current))

    def inverse_job(self, method: inv.InverseMethod, damping: float, allow_low_rank: bool) -> inversion.InverseJob:
        """The inverse to compute now: after a checkpoint load, the one the checkpointed run used."""
        if self._restored is not None:
            source, damping = self._restored.source, self._restored.damping
        else:
            source = dict(self._factors)
        method_type = inversion.method_for(self.inverse_type(method), source, allow_low_rank)
        dtype = method_type.storage_dtype(damping, self.factor_dtype)
        return inversion.InverseJob(self, method_type, source, damping, dtype)

    def install(self, job: inversion.InverseJob, owner: int, inverse: inv.BlockInverse | None) -> None:
        """Use ``inverse`` (computed here, a buffer to receive it, or ``None`` where only the owner applies it)."""
        restored = self._restored
        self._owner, self._inverse = owner, inverse
        self._inverse_source, self._inverse_damping = job.factors, job.damping
        if restored is None:
            self._inverse_versions = dict(self._versions)
        else:  # built from the factors at load: a refresh since then (this step's) leaves it out of date
            self._inverse_versions = {s: -1 for s in self._versions} if restored.stale else dict(restored.versions)
        self._restored = None

    # ---- verbs: checkpoints (a flat dict of named tensors and numbers) ---------------------------------------------
    def state(self) -> dict[str, Any]:
        """Factors (``factor.<stat>``, dense), schedule (``interval.<stat>``,
        ``next_due.<stat>``, ``refreshes.<stat>``), ``estimated.<stat>``, and what the inverse was built from:
        ``inverse_damping``, ``inverse.<stat>`` for the factors refreshed since (the others are current) and
        ``inverse.<stat>.rows`` / ``.n`` for a low-rank one."""
        # with the rows of low-rank factors: the next inversion uses them (Woodbury), as after a refresh
        out = fac.flatten("factor.", self._factors)
        for key, values in (("interval", self._interval), ("next_due", self._next_due),
                            ("refreshes", self._refreshes)):
            out.update({f"{key}.{stat}": int(v) for stat, v in values.items()})
        out.update({f"estimated.{stat}": flag.clone() for stat, flag in self._estimated.items()})
        # loaded but not stepped since: the inverse to rebuild is the checkpoint's (saving now must keep it)
        restored = self._restored
        source = restored.source if restored is not None else (self._inverse_source or {})
        out["inverse_damping"] = restored.damping if restored is not None else self._inverse_damping
        current = {s: f.dense() for s, f in self._factors.items()}
        out.update(fac.flatten("inverse.", source, current))
        return out

    def check_state(self, state: dict[str, Any]) -> bool:
        """Validate a checkpointed state: wrong shapes raise ``ValueError`` naming the layer and the fix;
        non-finite factors return False (the block is then reset, with a warning)."""
        shapes = self.factor_shapes()
        saved = [(key.split(".")[1], t) for key, t in state.items() if key.count(".") == 1 and (
            key.startswith("factor.") or (key.startswith("inverse.") and key.split(".")[1] in self.stat_names))]
        for stat, tensor in saved:
            if stat not in shapes or tuple(tensor.shape) != shapes[stat]:
                raise ValueError(f"K-FAC checkpoint: layer {self.name!r} has {stat} of shape "
                                 f"{tuple(getattr(tensor, 'shape', ()))}, the model's needs "
                                 f"{shapes.get(stat)}; the checkpoint is from another model or configuration.")
        for key, rows in state.items():
            stat = key[len("factor."):-len(".rows")]
            if key.startswith("factor.") and key.endswith(".rows") and (
                    stat not in shapes or rows.dim() != 3 or rows.shape[-1] != shapes[stat][-1]):
                raise ValueError(f"K-FAC checkpoint: layer {self.name!r} has low-rank rows of {stat} of shape "
                                 f"{tuple(rows.shape)}, the model's need [groups, r, {shapes.get(stat, (None,))[-1]}]; "
                                 "the checkpoint is from another model or configuration.")
        return all(bool(torch.isfinite(t).all()) for _, t in saved)

    def restore(self, state: dict[str, Any], valid: bool, step: int, damping: float) -> None:
        """Load :meth:`state` (checked by :meth:`check_state`); an invalid one resets the statistics, due at
        ``step``. The inverse is rebuilt at the next step from exactly what the checkpointed run used."""
        device = self.weight.device
        self._factors, self._inverse, self._owner, self._restored, self._inverse_versions = {}, None, None, None, None
        self._estimated = {s: torch.zeros((), dtype=torch.bool, device=device) for s in self.stat_names}
        for stat in self.stat_names:
            self._interval[stat] = int(state.get(f"interval.{stat}", self._interval[stat]))
            self._refreshes[stat] = int(state.get(f"refreshes.{stat}", self._refreshes[stat]))
        if not valid:
            self._next_due = dict.fromkeys(self.stat_names, step)
            return
        for stat in self.stat_names:
            self._next_due[stat] = int(state.get(f"next_due.{stat}", self._next_due[stat]))
        kinds = {stat: self.factor_kind(stat) for stat in self.stat_names}
        for stat, factor in fac.unflatten("factor.", state, {}, kinds, device, self.factor_dtype).items():
            self.set_factor(stat, factor)
            self._estimated[stat] = torch.as_tensor(state.get(f"estimated.{stat}", True), device=device)
        if self.captured:
            source = fac.unflatten("inverse.", state, dict(self._factors), kinds, device)
            stale = any(f"inverse.{s}" in state for s in self.stat_names)
            self._restored = Restored(source, state.get("inverse_damping") or damping, stale, dict(self._versions))
