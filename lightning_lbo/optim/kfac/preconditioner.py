"""KFACPreconditioner: K-FAC / SP-NGD natural-gradient preconditioning of a module's gradients.

Martens & Grosse 2015 (K-FAC), Grosse & Martens 2016 (KFC for conv), Osawa et al. 2019/2020
(large-batch K-FAC, SP-NGD: unit-wise BN Fisher, stale statistics). Formulas and the scaling
convention: :mod:`.blocks`; factor types: :mod:`.factors`; damping and inverses: :mod:`.inverses`;
hooks: :mod:`.capture`; stale statistics: :mod:`.stale`; knobs: :mod:`.settings`. The preconditioner only
schedules: capture -> commit -> invert -> apply (the work of a refresh: :mod:`.refresh`; checkpoints:
:mod:`.checkpoint`); the blocks own their state and its transitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import factors as fac
from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac import placement, refresh, settings, shard_modes
from lightning_lbo.optim.kfac.apply import precondition
from lightning_lbo.optim.kfac.binding import build_blocks, check_bound, check_communicator
from lightning_lbo.optim.kfac.blocks import CurvatureBlock, LinearVariant
from lightning_lbo.optim.kfac.blocks.registry import BlockRegistry
from lightning_lbo.optim.kfac.capture import Capture
from lightning_lbo.optim.kfac.checkpoint import preconditioner_state, read_preconditioner_state
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.fisher import LabelSampler, check_mc_settings
from lightning_lbo.optim.kfac.settings import check_keywords, resolve  # noqa: F401 (their former home)
from lightning_lbo.optim.kfac.stale import StaleStatistics

Layer = nn.Module | str
_resolve = resolve  # the former private name


@settings.expose_settings  # pre.damping, pre.fisher, ...: every settings field, read only, under its constructor name
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

    Settings, in three frozen objects documented field by field (:mod:`.settings`), each field a keyword argument
    here and a read-only attribute (``pre.damping``): :attr:`curvature` (:class:`.CurvatureSettings`: ``fisher``,
    ``likelihood``, ``output_to_logits``, ``linear_variant``, ``factor_dtype``, ``exclude``, ``classes_dim``),
    :attr:`schedule` (:class:`.ScheduleSettings`: ``factor_update_interval``, ``inverse_update_interval``,
    ``factor_decay``, ``stale_statistics``) and :attr:`inverses` (:class:`.InverseSettings`: ``damping``,
    ``inverse_method``, ``low_rank_inverse``, ``kl_clip``, ``l2``). The other arguments:

    Args:
        module: the model to hook; ``None`` to bind later with :meth:`bind`.
        grad_scaler: AMP ``GradScaler`` whose scale multiplies the output gradients (16-mixed).
        mc_seed: seed of the labels ``fisher="mc"`` samples (checkpointed with the draw count, so a resume
            samples the labels of the uninterrupted run); ``None``: ``torch.initial_seed()``.
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

    def __init__(self, module: nn.Module | None = None, *, damping: settings.FloatSchedule = 1e-3,
                 factor_decay: float = 1.0, factor_update_interval: settings.IntSchedule = 10,
                 inverse_update_interval: settings.IntSchedule = 10, inverse_method: str = "cholesky",
                 fisher: str = "empirical", likelihood: str | None = None,
                 output_to_logits: Callable[[Any], torch.Tensor] | None = None, kl_clip: float | None = 1e-3,
                 stale_statistics: StaleStatistics | None = None, exclude: Iterable[nn.Module | str | type] = (),
                 linear_variant: str | LinearVariant = LinearVariant.EXPAND, l2: float = 0.0, grad_scaler: Any = None,
                 low_rank_inverse: bool = True, factor_dtype: torch.dtype | None = None,
                 comm: Communicator | None = None, params: Iterable[torch.Tensor] | None = None,
                 block_types: Mapping[type[nn.Module], type[CurvatureBlock]] | None = None,
                 classes_dim: int | None = None, mc_seed: int | None = None,
                 shard_placement: str = "replicate") -> None:
        self.inverses = settings.InverseSettings(damping, inverse_method, low_rank_inverse, kl_clip, l2)
        self.schedule = settings.ScheduleSettings(factor_update_interval, inverse_update_interval, factor_decay,
                                                  stale_statistics)
        self.curvature = settings.CurvatureSettings(fisher, likelihood, output_to_logits, linear_variant, factor_dtype,
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
        self._statistics = refresh.StatisticsRefresh()  # one-time warnings, the retry of unestimated statistics
        self._params = None if params is None else list(params)
        if module is not None:
            self.bind(module)

    @property
    def factor_dtype(self) -> torch.dtype | None:
        """The factors' dtype (``None`` until bound when left to the model's precision)."""
        return self._factor_dtype

    def signature(self) -> dict[str, Any]:
        """Rank-independent, picklable description compared across ranks: the class, each layer's block type
        and factor sizes, and every setting (derived from the settings objects: callables by qualified name,
        enums by value)."""
        described = {**settings.signature_settings(self), "factor_dtype": settings.describe(self._factor_dtype),
                     "shard_placement": self.placement.name}
        return {"class": type(self).__qualname__, "layers": [f"{b.name}: {b.description}" for b in self.blocks],
                "settings": described}

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
        placement.refuse_fsdp1(module)
        if self._factor_dtype is None:
            self._factor_dtype = settings.model_factor_dtype(module)
        self.blocks = build_blocks(module, self.registry, self.curvature, self.schedule, self.inverses,
                                   self._factor_dtype, list(params) if params is not None else self._params)
        self.module = module
        self.capture = Capture(self.blocks, module, fisher=self.fisher, likelihood=self.likelihood,
                               output_to_logits=self.output_to_logits, on_statistic=self._reduce,
                               classes_dim=self.classes_dim, sampler=self.label_sampler)
        self.capture.grad_scaler = self._grad_scaler
        if not self._comm_injected and not self.comm.is_distributed:  # sharded parameters carry their mesh
            comm = placement.sharded_communicator(self.blocks)
            if comm is not None:
                self.set_communicator(comm)
        self.skipped_refreshes = self.skipped_refreshes.to(self.blocks[0].weight.device)
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
        """Refuse to run on several ranks with the single-process communicator (ranks would drift apart), at the
        first capture and the first step (:func:`~lightning_lbo.optim.kfac.binding.check_communicator`); under
        Lightning, ``KFACCallback`` (passed by the user, or added by ``strategy="ddp_kfac"``) injects it."""
        if not (self._comm_injected or self._comm_checked):
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
        skipped = self._statistics.commit(self.blocks, self.capture, self._due, keep, self.steps, self.comm,
                                          self.schedule, self.fisher)  # the statistics' refresh, when due
        if skipped is not None:
            self.skipped_refreshes += skipped.to(self.skipped_refreshes.device)
        self.placement.after_commit(self)
        self.placement.update_inverses(self)
        self.placement.precondition(self, lr)
        self.steps += 1
        self._plan_captures()

    def _update_inverses(self) -> None:
        self.inverse_fallbacks += refresh.refresh_inverses(self.blocks, self.schedule.inverse_due(self.steps),
                                                           self.inverse_method, self.current_damping(), self.comm,
                                                           self.precondition_on_owner_only)

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
        return preconditioner_state(self.blocks, self.placement.block_states(self), self.steps,
                                    self.skipped_refreshes, self.inverse_fallbacks, self.label_sampler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Factors of the wrong shape raise ``ValueError`` naming the layer; a layer
        with non-finite factors is reset (statistics re-estimated at the next step) with a warning."""
        if self.module is None:
            raise RuntimeError("Bind the preconditioner to its module before load_state_dict.")
        policy = self.stale_statistics
        loaded = read_preconditioner_state(state, self.blocks, policy.max_interval if policy is not None else None)
        self.steps = loaded.steps
        self.skipped_refreshes = loaded.skipped_refreshes.to(self.skipped_refreshes.device).clone()
        self.inverse_fallbacks = loaded.inverse_fallbacks
        self.label_sampler.load_state_dict(loaded.mc_sampling)
        for block, flat, ok in zip(self.blocks, loaded.block_states, loaded.valid, strict=True):
            block.restore(flat, ok, self.steps, self.current_damping())
        self._statistics.first_estimates.reset(self.blocks)
        self.placement.after_load(self)
        self.discard_pending()
        self._plan_captures()
