"""KFACPreconditioner: K-FAC / SP-NGD natural-gradient preconditioning of a module's gradients.

Martens & Grosse 2015 (K-FAC), Grosse & Martens 2016 (KFC for conv), Osawa et al. 2019/2020
(large-batch K-FAC, SP-NGD: unit-wise BN Fisher, stale statistics). Formulas and the scaling
convention: :mod:`.blocks`; factor types: :mod:`.factors`; damping and inverses: :mod:`.inverses`;
hooks: :mod:`.capture`; stale statistics: :mod:`.stale`; knobs: :mod:`.settings`. The preconditioner only
schedules: capture -> commit -> invert -> apply; the blocks own their state and its transitions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac import inversion, placement, shard_modes
from lightning_lbo.optim.kfac.agreement import agree_on_captures, reduce_by_block
from lightning_lbo.optim.kfac.apply import precondition
from lightning_lbo.optim.kfac.binding import check_bound, check_communicator
from lightning_lbo.optim.kfac.blocks import CurvatureBlock, LinearVariant
from lightning_lbo.optim.kfac.blocks.registry import BlockRegistry, find_blocks
from lightning_lbo.optim.kfac.capture import Capture
from lightning_lbo.optim.kfac.checkpoint import check_block_states, flat_block_state, nested_block_state
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.first_estimate import FirstEstimates
from lightning_lbo.optim.kfac.fisher import Fisher, LabelSampler, check_mc_settings
from lightning_lbo.optim.kfac.settings import (  # noqa: F401 (check_keywords: its former home)
    CurvatureSettings,
    FloatSchedule,
    IntSchedule,
    InverseSettings,
    ScheduleSettings,
    check_keywords,
    describe,
    resolve,
)
from lightning_lbo.optim.kfac.stale import StaleStatistics

Layer = nn.Module | str
_resolve = resolve  # the former private name


def _setting(group: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, group), name), doc=f"``{group}.{name}`` (read only).")


class KFACPreconditioner:
    """Replace the gradients of supported layers by their K-FAC natural gradient, in place.

    Supported (:data:`~lightning_lbo.optim.kfac.blocks.BLOCK_TYPES`, extensible per preconditioner with
    ``block_types=`` or globally with :func:`~lightning_lbo.optim.kfac.blocks.register_block`): ``nn.Linear``
    (any input rank), ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.MultiheadAttention``,
    ``BatchNorm1d/2d/3d`` and ``LayerNorm`` (unit-wise). Other parameters are left untouched (the optimizer
    behind applies its own update) and listed once in a warning. Usable in front of any optimizer::

        pre = KFACPreconditioner(model, damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()   # hooks capture factors on refresh steps
            pre.step(lr=0.1)                  # precondition .grad in place
            opt.step()

    Args (grouped into :attr:`curvature`, :attr:`schedule` and :attr:`inverses`, see :mod:`.settings`):
        module: the model to hook; ``None`` to bind later with :meth:`bind`.
        damping: Tikhonov damping ``lambda``, a float or ``step -> float``.
        factor_decay: weight of a new statistic in the running average of factors,
            ``factor <- (1 - factor_decay) * factor + factor_decay * new``; ``1.0`` (default) keeps fresh
            statistics (Osawa et al., 32K); ``0.05`` averages over about 20 refreshes.
        factor_update_interval / inverse_update_interval: steps between refreshes (int or ``step -> int``).
        inverse_method: ``"cholesky"`` (factored Tikhonov, fastest) or ``"eigen"`` (exact damping).
        fisher: ``"empirical"`` or ``"mc"`` (one sampled label per example; see ``output_to_logits``).
        likelihood: for ``fisher="mc"``: ``"categorical"`` (default; logits ``[N, C, *]``) or ``"gaussian"``;
            passing it with the empirical Fisher (which uses the training loss) raises ``ValueError``.
        output_to_logits: maps the root module's forward output to the logits (e.g. ``lambda o: o[0]``).
        classes_dim: for ``fisher="mc"`` with categorical logits: their classes axis (``1`` for
            ``[N, C, *]``, ``-1`` for ``[N, T, V]``); ``None`` (default): the module's
            ``logits_classes_dim`` attribute if it declares one (``lightning_lbo.lm.GPT`` does), else ``1``.
        mc_seed: seed of the labels ``fisher="mc"`` samples (checkpointed with the draw count, so a resume
            samples the labels of the uninterrupted run); ``None``: ``torch.initial_seed()``.
        kl_clip: scale the update so that ``lr^2 * sum <P, grad>`` is at most ``kl_clip``; ``None`` off.
        stale_statistics: a :class:`StaleStatistics` policy (per-statistic adaptive intervals) or ``None``.
        exclude: modules, their qualified names or module types to leave to the plain update (e.g.
            ``[model.fc]``, ``["fc"]``, ``nn.Embedding``); a module or name not in the bound model raises.
        linear_variant: :class:`LinearVariant` (or ``"expand"`` / ``"reduce"``) for Linear inputs ``[N, T, in]``.
        l2: L2 folded in: ``l2 * w`` is added to each preconditioned gradient and the damping becomes
            ``max(damping, l2)``.
        grad_scaler: AMP ``GradScaler`` whose scale multiplies the output gradients (16-mixed).
        low_rank_inverse: with fresh statistics, the cholesky method and one process, apply
            ``(A + delta I)^{-1}`` through the Woodbury identity when a batch has fewer rows than half of ``d``.
        factor_dtype: dtype of the factors; ``None``: fp64 for a model with fp64 weights, else fp32, except
            for blocks whose inverse damps exactly (eigen, embeddings, unit-wise below damping 1e-3): fp64.
        comm: the :class:`Communicator` (single process: the no-op default; injected under DDP).
        params: only layers whose parameters are all among these get a block (default: all).
        block_types: ``{module type: block class}`` for this preconditioner, over the global registry.
        shard_placement: where the curvature lives across ranks (:mod:`.shard_modes`): ``"replicate"`` (every
            rank holds all of it), ``"owner"`` (exact; each block on one rank, about 1/P each) or ``"local"``
            (each rank preconditions the rows it holds with its diagonal block of ``G``: an approximation).

    Distributed seam (all collectives go through ``self.comm``; in one process they are no-ops):
    ``reduce_factors`` as the hooks finish a statistic, ``wait`` at the start of :meth:`step`,
    ``all_min`` on the "finite" (and "stable") flags of a refresh, ``assign`` and ``broadcast`` per inverse
    update (or of the preconditioned gradient when the communicator's ``owners_precondition`` is true).
    """

    def __init__(self, module: nn.Module | None = None, *, damping: FloatSchedule = 1e-3,
                 factor_decay: float = 1.0, factor_update_interval: IntSchedule = 10,
                 inverse_update_interval: IntSchedule = 10, inverse_method: str = "cholesky",
                 fisher: str = "empirical", likelihood: str | None = None,
                 output_to_logits: Callable[[Any], torch.Tensor] | None = None, kl_clip: float | None = 1e-3,
                 stale_statistics: StaleStatistics | None = None, exclude: Iterable[nn.Module | str | type] = (),
                 linear_variant: str | LinearVariant = LinearVariant.EXPAND, l2: float = 0.0, grad_scaler: Any = None,
                 low_rank_inverse: bool = True, factor_dtype: torch.dtype | None = None,
                 comm: Communicator | None = None, params: Iterable[torch.Tensor] | None = None,
                 block_types: Mapping[type[nn.Module], type[CurvatureBlock]] | None = None,
                 classes_dim: int | None = None, mc_seed: int | None = None,
                 shard_placement: str = "replicate") -> None:
        self.inverses = InverseSettings(damping, inverse_method, low_rank_inverse, kl_clip, l2)
        self.schedule = ScheduleSettings(factor_update_interval, inverse_update_interval, factor_decay,
                                         stale_statistics)
        self.curvature = CurvatureSettings(fisher, likelihood, output_to_logits, linear_variant, factor_dtype,
                                           tuple(exclude), classes_dim)
        check_mc_settings(self.curvature.fisher, self.curvature.likelihood, classes_dim, mc_seed)
        self.placement = shard_modes.make_placement(shard_placement, stale_statistics)  # where curvature lives
        self.registry = BlockRegistry.with_overrides(self.placement.block_types(block_types))
        self._factor_dtype = factor_dtype  # resolved at bind
        self.comm: Communicator = comm if comm is not None else Communicator()
        self.label_sampler = LabelSampler(mc_seed)  # the labels of fisher="mc"; distinct per rank
        self.label_sampler.rank = self.comm.rank
        self._comm_injected = comm is not None
        self._comm_checked = False
        self._grad_scaler = grad_scaler
        self.steps = 0
        self.module: nn.Module | None = None
        self.blocks: list[CurvatureBlock] = []
        self.capture: Capture | None = None
        self.last_kl_clip_factor: torch.Tensor | None = None
        self.skipped_refreshes = torch.zeros((), dtype=torch.long)
        self.inverse_fallbacks = 0
        self._due: dict[int, set[str]] = {}
        self._warned_missing = False
        self._warned_partial = False
        self._first_estimates = FirstEstimates()  # the retry of statistics whose first refresh was skipped
        self._params = None if params is None else list(params)
        if module is not None:
            self.bind(module)

    # the settings, readable under their constructor names
    damping = _setting("inverses", "damping")
    inverse_method = _setting("inverses", "inverse_method")
    low_rank_inverse = _setting("inverses", "low_rank_inverse")
    kl_clip = _setting("inverses", "kl_clip")
    l2 = _setting("inverses", "l2")
    factor_update_interval = _setting("schedule", "factor_update_interval")
    inverse_update_interval = _setting("schedule", "inverse_update_interval")
    factor_decay = _setting("schedule", "factor_decay")
    stale_statistics = _setting("schedule", "stale_statistics")
    fisher = _setting("curvature", "fisher")
    likelihood = _setting("curvature", "likelihood")
    output_to_logits = _setting("curvature", "output_to_logits")
    linear_variant = _setting("curvature", "linear_variant")
    exclude = _setting("curvature", "exclude")
    classes_dim = _setting("curvature", "classes_dim")

    @property
    def factor_dtype(self) -> torch.dtype | None:
        """The factors' dtype (``None`` until bound when left to the model's precision)."""
        return self._factor_dtype

    def signature(self) -> dict[str, Any]:
        """Rank-independent, picklable description compared across ranks: the class, each layer's block type
        and factor sizes, and every setting (derived from the settings objects: callables by qualified name,
        enums by value)."""
        settings = {f"{group}.{key}": value for group in ("curvature", "schedule", "inverses")
                    for key, value in describe(getattr(self, group)).items()}
        settings["factor_dtype"] = describe(self._factor_dtype)
        settings["shard_placement"] = self.placement.name
        return {"class": type(self).__qualname__, "layers": [f"{b.name}: {b.description}" for b in self.blocks],
                "settings": settings}

    # ------------------------------------------------------------------ binding and teardown
    def set_communicator(self, comm: Communicator) -> None:
        """Install the communicator (the Lightning layer does this at setup under DDP)."""
        self.comm = comm
        self._comm_injected = True
        self.label_sampler.rank = comm.rank
        if self.capture is not None and comm.is_distributed:
            for block in self.blocks:
                block.capture_rows(False)  # the low-rank inverse is single-process only

    @property
    def precondition_on_owner_only(self) -> bool:
        """Distributed only: the owner of a layer preconditions it and broadcasts P (not the inverse)."""
        return self.comm.is_distributed and bool(getattr(self.comm, "owners_precondition", False))

    @property
    def grad_scaler(self) -> Any:
        return self._grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        self._grad_scaler = scaler
        if self.capture is not None:
            self.capture.grad_scaler = scaler

    @property
    def bound(self) -> bool:
        return self.module is not None

    def bind(self, module: nn.Module, params: Iterable[torch.Tensor] | None = None) -> None:
        """Build a block for each supported layer of ``module`` and register the capture hooks.

        Only layers whose parameters are all in ``params`` (default: the constructor's ``params``,
        else all) and require grad get a block. Binding twice to the same module is a no-op.
        Building another preconditioner on the same module later removes these hooks.
        """
        if self.module is module and self.capture is not None and self.capture.hooked:
            return
        if self.module is not None and self.module is not module:
            raise RuntimeError("This KFACPreconditioner is already bound to another module; build a new one.")
        exact_in_fp64 = self.curvature.factor_dtype is None
        if self._factor_dtype is None:
            weights = [p for p in module.parameters() if p.is_floating_point()]
            self._factor_dtype = torch.float64 if weights and weights[0].dtype == torch.float64 else torch.float32
        damping = self.inverses.damping
        if (self.inverse_method is inv.InverseMethod.EIGEN and self._factor_dtype == torch.float32
                and not exact_in_fp64 and not callable(damping) and damping < 1e-3):
            warnings.warn(f"inverse_method='eigen' with damping {damping:g} < 1e-3 and fp32 factors: the "
                          "factors' rounding (~1e-7 of their norm) exceeds the damping; pass "
                          "factor_dtype=torch.float64.", UserWarning, stacklevel=3)
        blocks, unsupported = find_blocks(module, self.registry, exclude=self.exclude,
                                          params=list(params) if params is not None else self._params,
                                          factor_dtype=self._factor_dtype, linear_variant=self.linear_variant)
        if not blocks:
            supported = ", ".join(t.__name__ for t in self.registry.types)
            raise ValueError(f"{type(module).__name__} has no layer K-FAC supports ({supported}) among the "
                             "optimized, non-excluded parameters; use a first-order optimizer.")
        if unsupported:
            layers = "1 layer" if len(blocks) == 1 else f"{len(blocks)} layers"
            warnings.warn(f"K-FAC preconditions {layers}; these get the plain momentum-SGD update: "
                          f"{', '.join(unsupported)}.", UserWarning, stacklevel=3)
        interval = int(resolve(self.factor_update_interval, 0))
        for block in blocks:
            placement.check_shardable(block)
            block.start_schedule(interval)
            method = block.inverse_type(self.inverse_method)
            if exact_in_fp64 and method.exact_damping and (callable(damping) or damping < method.fp32_factors_from):
                block.promote_factor_dtype(torch.float64)
        self.module = module
        self.blocks = blocks
        self.capture = Capture(blocks, module, fisher=self.fisher, likelihood=self.likelihood,
                               output_to_logits=self.output_to_logits, on_statistic=self._reduce,
                               classes_dim=self.classes_dim, sampler=self.label_sampler)
        self.capture.grad_scaler = self._grad_scaler
        self.skipped_refreshes = self.skipped_refreshes.to(blocks[0].weight.device)
        self._plan_captures()

    def remove_hooks(self) -> None:
        """Remove every capture hook (teardown). The preconditioner still applies its last inverses."""
        if self.capture is not None:
            self.capture.remove()

    def _reduce(self, statistic: Any, symmetric: bool) -> None:
        self._check_communicator()
        tensors = fac.wire(statistic)
        # a deferred low-rank Gram: one process, nothing to average; without reduce_in_hooks: at step time, by block
        if tensors and self.comm.reduce_in_hooks:
            self.comm.reduce_factors(tensors, symmetric=symmetric)

    def _check_communicator(self) -> None:
        """Refuse to run on several ranks with the single-process communicator (ranks would drift apart).

        Runs at the first capture and the first step (:func:`~lightning_lbo.optim.kfac.binding.check_communicator`).
        Under Lightning, ``KFACCallback`` (passed by the user, or added by ``strategy="ddp_kfac"``) injects the
        communicator at ``on_fit_start``; anyone else injects it.
        """
        if self._comm_injected or self._comm_checked:
            return
        check_communicator(self)
        self._comm_checked = True  # one process: the no-op communicator is the right one

    # ------------------------------------------------------------------ public read access
    def block(self, layer: Layer) -> CurvatureBlock:
        """The curvature block of ``layer`` (the module or its qualified name)."""
        for block in self.blocks:
            if block.name == layer or any(module is layer for module, _ in block.uses()):
                return block
        names = [b.name for b in self.blocks]
        raise KeyError(f"{layer!r} is not a layer K-FAC preconditions; preconditioned layers: {names}.")

    def factors(self, layer: Layer) -> dict[str, torch.Tensor]:
        """The current factors of ``layer`` (``{"A", "G"}`` or ``{"F"}``; empty before the first capture).
        Read only: the tensors are replaced, never modified, at the next refresh."""
        return self.block(layer).factors

    def inverse(self, layer: Layer) -> inv.BlockInverse | None:
        """The inverse in use for ``layer`` (``None`` before the first inversion, or on a non-owner rank
        when owners precondition); ``inverse(layer).apply(grad_matrix, damping)`` preconditions."""
        return self.block(layer).inverse

    # ------------------------------------------------------------------ step
    def current_damping(self) -> float:
        return self.inverses.damping_at(self.steps)

    def _plan_captures(self) -> None:
        """Arm the hooks for the coming step (host-side ints only)."""
        self._due = {id(b): b.due(self.steps) for b in self.blocks}
        low_rank = (self.low_rank_inverse and self.factor_decay == 1.0 and not self.comm.is_distributed
                    and self.inverse_method is inv.InverseMethod.CHOLESKY)
        self.capture.begin(self._due)
        # stale statistics compare each new factor with the last one densely, so they keep the Gram
        for block in self.blocks:
            block.capture_rows(low_rank, defer=self.stale_statistics is None)

    def discard_pending(self) -> None:
        """Drop statistics captured since the last step (e.g. after a step skipped by the AMP scaler)."""
        if self.capture is not None:
            self.capture.discard()

    def run_mc_backward(self, logits: torch.Tensor) -> None:
        """Run the sampled-label backward for the current forward now (if the model's output is not the logits).
        Call it before the training backward, with the logits computed by the current forward."""
        self.capture.run_mc_backward(logits)

    def _warn_missing(self, missing: list[str]) -> None:
        if self._warned_missing or not missing:
            return
        self._warned_missing = True
        if self.fisher is Fisher.MC:
            fix = self.capture.mc_missing_reason(missing)
        else:
            fix = "their outputs received no gradient; exclude them (exclude=[...]) if they do not reach the loss"
        warnings.warn(f"K-FAC captured no output-gradient statistic for {missing} on a refresh step: {fix}. "
                      "These layers keep their previous (initially identity) factor.", RuntimeWarning, stacklevel=4)

    def _commit_statistics(self, keep: torch.Tensor | None) -> None:
        """Turn captured sums into factors (running average), skipping non-finite ones on every rank."""
        self.comm.wait()
        captured = self.capture.collect()
        if self.comm.is_distributed and any(self._due.values()):  # a refresh step (the same on every rank)
            captured, warned = agree_on_captures(self.blocks, captured, self.comm, not self._warned_partial)
            self._warned_partial |= warned
        if not captured:
            return
        news: list[tuple[CurvatureBlock, str, fac.Factor]] = []
        missing = []
        per_example = self.fisher is Fisher.EMPIRICAL  # sampled-label gradients are already per example
        for block in self.blocks:
            record = captured.get(id(block))
            if record is None:
                continue
            if block.output_stat in self._due[id(block)] and block.output_stat not in record.sums:
                missing.append(block.name)
            order = block.stat_names.index  # the same order on every rank, whatever order the hooks ran in
            news.extend((block, stat, new) for stat, new in sorted(
                block.statistics(record.sums, record.examples, per_example), key=lambda item: order(item[0])))
        self._warn_missing(missing)
        if not news:
            return
        if self.comm.is_distributed and not self.comm.reduce_in_hooks:
            reduce_by_block(news, self.comm)  # every rank holds the same (block, statistic) list (agreed above)
        finite = torch.stack([new.finite() for _, _, new in news])
        if keep is not None:
            finite = finite & keep.to(finite.device)
        ok = self.comm.all_min(finite.float()) > 0
        self.skipped_refreshes += (~ok).sum().to(self.skipped_refreshes.device)
        track = self.stale_statistics is not None
        changes = [block.commit(stat, new, ok[j], self.factor_decay, track)
                   for j, (block, stat, new) in enumerate(news)]
        self._update_intervals(news, ok, changes)
        self._first_estimates.retry(news, self.steps)

    def _update_intervals(self, news, ok: torch.Tensor, changes: list[torch.Tensor | None]) -> None:
        base = max(1, int(resolve(self.factor_update_interval, self.steps)))
        policy = self.stale_statistics
        if policy is None:
            for block, stat, _ in news:
                block.reschedule(stat, base, self.steps)
            return
        flags = [(change < policy.threshold) & ok[j] if change is not None else
                 torch.zeros((), dtype=torch.bool, device=ok.device) for j, change in enumerate(changes)]
        stable = self.comm.all_min(torch.stack(flags).float()).tolist()  # one sync per refresh step
        for (block, stat, _), change, flag in zip(news, changes, stable, strict=True):
            interval = block.interval[stat]
            block.reschedule(stat, policy.next_interval(interval, flag > 0) if change is not None else interval,
                             self.steps)

    def _update_inverses(self) -> None:
        due = self.steps % max(1, int(resolve(self.inverse_update_interval, self.steps))) == 0
        todo = [block for block in self.blocks if block.needs_inverse(due)]
        if not todo:
            return
        damping, distributed = self.current_damping(), self.comm.is_distributed
        jobs = [block.inverse_job(self.inverse_method, damping, allow_low_rank=not distributed) for block in todo]
        owners = self.comm.assign([block.cost() for block in todo])
        rank = self.comm.rank
        mine = [job for job, owner in zip(jobs, owners, strict=True) if owner == rank]
        computed: dict[int, inv.BlockInverse] = {}
        if mine:
            inverses, failed = inversion.invert_with_fallback(mine)
            self.inverse_fallbacks += len(failed)
            computed = {id(job.block): inverse for job, inverse in zip(mine, inverses, strict=True)}
        owners_only = self.precondition_on_owner_only
        for job, owner in zip(jobs, owners, strict=True):
            if owner == rank:
                inverse = computed[id(job.block)]
            else:  # several ranks: a buffer to receive the owner's inverse, or none where owners precondition
                inverse = None if owners_only else job.method.receiver(fac.dense_factors(job.factors), job.dtype)
            job.block.install(job, owner, inverse)
            if distributed and not owners_only:
                self.comm.broadcast(inverse.tensors(), src=owner, symmetric=inverse.symmetric_flags())

    @torch.no_grad()
    def step(self, lr: float | None = None, keep: torch.Tensor | None = None) -> None:
        """Refresh factors/inverses when due and precondition the gradients in place.

        A step that refreshes nothing makes no host synchronisation.

        Args:
            lr: the learning rate of the update that follows (needed by ``kl_clip``).
            keep: 0-d bool tensor, False when the optimizer skips this step: the statistics captured
                for it are then not committed (factors stay bit-identical), decided on the device.
        """
        if self.module is None:
            raise RuntimeError("KFACPreconditioner is not bound to a module: call bind(model) first "
                               "(with Lightning, add lightning_lbo.callbacks.KFACCallback or build KFAC(self, ...)).")
        if self.kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs the learning rate: call step(lr=...) or set kl_clip=None.")
        self._check_communicator()
        check_bound(self)  # once: several ranks or an AMP scale that no KFACCallback provided fail here, loudly
        self._commit_statistics(keep)
        self.placement.after_commit(self)
        self.placement.update_inverses(self)
        self.placement.precondition(self, lr)
        self.steps += 1
        self._plan_captures()

    def _precondition(self, lr: float | None) -> None:
        work = [b for b in self.blocks if b.owner is not None and all(p.grad is not None for p in b.params)]
        with ExitStack() as wholes:  # sharded parameters: whole gradients while inside, own rows written back at exit
            for block in work:
                wholes.enter_context(placement.whole_parameters(block, values=self.l2 > 0,
                                                                stats=getattr(self.comm, "stats", None)))
            nu = precondition(work, self.current_damping(), lr, l2=self.l2, kl_clip=self.kl_clip, comm=self.comm,
                              owners_only=self.precondition_on_owner_only)
        if nu is not None:
            self.last_kl_clip_factor = nu

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Per block, its name, type, factors, schedule and what the current inverse was built from (the nested
        form of :meth:`~.blocks.CurvatureBlock.state`, a flat dict), and the counters.

        Inverses are not saved: :meth:`load_state_dict` rebuilds them from exactly the factors (and low-rank
        rows) and damping the checkpointed run used, so a resume continues bit for bit.
        """
        blocks = [{"name": block.name, "type": block.description, **nested_block_state(state)}
                  for block, state in zip(self.blocks, self.placement.block_states(self), strict=True)]
        return {"steps": self.steps, "blocks": blocks, "skipped_refreshes": self.skipped_refreshes.clone(),
                "inverse_fallbacks": self.inverse_fallbacks, "mc_sampling": self.label_sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Factors of the wrong shape raise ``ValueError`` naming the layer; a layer
        with non-finite factors is reset (statistics re-estimated at the next step) with a warning."""
        if self.module is None:
            raise RuntimeError("Bind the preconditioner to its module before load_state_dict.")
        entries = state.get("blocks", [])
        names = [block.name for block in self.blocks]
        if [e["name"] for e in entries] != names:
            raise ValueError(f"K-FAC checkpoint layers {[e['name'] for e in entries]} do not match the model's "
                             f"{names}.")
        flats = [flat_block_state(entry) for entry in entries]
        policy = self.stale_statistics
        steps = state.get("steps", 0)
        valid = check_block_states(self.blocks, flats, steps, policy.max_interval if policy is not None else None)
        self.steps = steps
        skipped = state.get("skipped_refreshes", torch.zeros((), dtype=torch.long))
        self.skipped_refreshes = skipped.to(self.skipped_refreshes.device).clone()
        self.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
        self.label_sampler.load_state_dict(state.get("mc_sampling", {}))
        for block, flat, ok in zip(self.blocks, flats, valid, strict=True):
            block.restore(flat, ok, self.steps, self.current_damping())
        self._first_estimates.reset(self.blocks)
        self.placement.after_load(self)
        self.discard_pending()
        self._plan_captures()
