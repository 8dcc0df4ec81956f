"""KFACPreconditioner: K-FAC / SP-NGD natural-gradient preconditioning of a module's gradients.

Martens & Grosse 2015 (K-FAC), Grosse & Martens 2016 (KFC for conv), Osawa et al. 2019/2020
(large-batch K-FAC, SP-NGD: unit-wise BN Fisher, stale statistics). Formulas and the scaling
convention: :mod:`.blocks`; damping and inverses: :mod:`.inverses`; hooks: :mod:`.capture`; stale
statistics: :mod:`.stale`. The preconditioner only schedules: capture -> commit -> invert -> apply.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac import inverses as inv
from lightning_lbo.optim.kfac.blocks import BLOCK_TYPES, EXPAND, CurvatureBlock, make_block, make_shared_block
from lightning_lbo.optim.kfac.capture import Capture, Captured
from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood, parse_enum
from lightning_lbo.optim.kfac.stale import StaleStatistics

FloatSchedule = float | Callable[[int], float]
IntSchedule = int | Callable[[int], int]
Layer = nn.Module | str


def _resolve(value, step: int):
    return value(step) if callable(value) else value


def check_keywords(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise ``TypeError`` naming ``owner``, each unknown keyword (with a close match) and the valid names."""
    accepted = sorted(accepted)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, accepted, 1))
                             else "") for k in unknown]
        raise TypeError(f"{owner} got unexpected keyword argument(s) {', '.join(hints)}. "
                        f"Valid: {', '.join(accepted)}.")


class KFACPreconditioner:
    """Replace the gradients of supported layers by their K-FAC natural gradient, in place.

    Supported (:data:`~lightning_lbo.optim.kfac.blocks.BLOCK_TYPES`, extensible with
    :func:`~lightning_lbo.optim.kfac.blocks.register_block`): ``nn.Linear`` (any input rank),
    ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, ``BatchNorm1d/2d/3d`` and ``LayerNorm`` (unit-wise).
    Other parameters are left untouched (the optimizer behind applies its own update) and listed
    once in a warning. Usable in front of any optimizer::

        pre = KFACPreconditioner(model, damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()   # hooks capture factors on refresh steps
            pre.step(lr=0.1)                  # precondition .grad in place
            opt.step()

    Args:
        module: the model to hook; ``None`` to bind later with :meth:`bind`.
        damping: Tikhonov damping ``lambda``, a float or ``step -> float``.
        factor_decay: weight of a new statistic in the running average of factors,
            ``factor <- (1 - factor_decay) * factor + factor_decay * new``. ``1.0`` (default) keeps
            fresh statistics, the large-batch setting of Osawa et al. (32K); ``0.05`` averages over
            about 20 refreshes (kfac-pytorch's ``factor_decay=0.95`` counts the other way).
        factor_update_interval: steps between factor refreshes (int or ``step -> int``).
        inverse_update_interval: steps between inverse updates (int or ``step -> int``).
        inverse_method: ``"cholesky"`` (factored Tikhonov, fastest) or ``"eigen"`` (exact damping).
        fisher: ``"empirical"`` or ``"mc"`` (one sampled label per example; needs the module's
            ``forward`` output to be the logits, see ``output_to_logits``).
        likelihood: for ``fisher="mc"``: ``"categorical"`` (default; logits ``[N, C, *]``) or ``"gaussian"``;
            passing it with the empirical Fisher (which uses the training loss) raises ``ValueError``.
        output_to_logits: maps the root module's forward output to the logits (e.g. ``lambda o: o[0]``).
        kl_clip: scale the update so that ``lr^2 * sum <P, grad>`` is at most ``kl_clip``; ``None`` off.
        stale_statistics: a :class:`StaleStatistics` policy (per-statistic adaptive intervals) or ``None``.
        exclude: modules, their qualified names or module types to leave to the plain update (e.g.
            ``[model.fc]``, ``["fc"]``, ``nn.Embedding``); a module or name not in the bound model raises.
        linear_variant: ``"expand"`` or ``"reduce"`` for Linear layers with ``[N, T, in]`` inputs.
        l2: L2 regularisation folded in: ``l2 * w`` is added to each preconditioned gradient and the
            damping becomes ``max(damping, l2)``.
        grad_scaler: AMP ``GradScaler`` whose scale multiplies the output gradients (16-mixed).
        low_rank_inverse: with fresh statistics (``factor_decay=1``), the cholesky method and one
            process, apply ``(A + delta I)^{-1}`` through the Woodbury identity when the batch has
            fewer rows (examples x positions) than half of ``d_A`` (much cheaper per step on wide layers).
        factor_dtype: dtype of the factors; ``None`` (default): ``torch.float64`` for a model with
            fp64 weights, else ``torch.float32``, except for blocks whose inverse damps exactly
            (``"eigen"``, embeddings, unit-wise BatchNorm/LayerNorm), which hold fp64 factors: fp32
            factors are rounded by ``~1e-7`` of their norm, more than a damping below 1e-3 (unit-wise
            blocks, whose statistics are activation-sized, stay fp32 at a fixed damping >= 1e-3).
        comm: the :class:`Communicator` (single process: the no-op default; injected by the Lightning
            layer under DDP).

    Distributed seam (all collectives go through ``self.comm``; in one process they are no-ops):

    * ``comm.reduce_factors([stat], symmetric)``: as soon as the hooks finish a micro-batch's
      statistic (forward for ``A``, backward for ``G``/``F``); may be asynchronous.
    * ``comm.wait()``: at the start of :meth:`step`, before any statistic is read.
    * ``comm.all_min(flags)``: on every refresh step, on the "statistic finite" flags (a skipped
      refresh is skipped on every rank) and, with ``stale_statistics``, on the "statistic stable" flags.
    * ``comm.assign(costs)``: on every inverse update; the owner computes the inverse, then
      ``comm.broadcast(inverse.tensors(), src=owner)`` per block.
    * With a communicator whose ``owners_precondition`` is true, inverses are not broadcast: the owner
      preconditions the block's gradient and ``comm.broadcast([P], src=owner)`` sends the result.
    """

    def __init__(self, module: nn.Module | None = None, *, damping: FloatSchedule = 1e-3,
                 factor_decay: float = 1.0, factor_update_interval: IntSchedule = 10,
                 inverse_update_interval: IntSchedule = 10, inverse_method: str = "cholesky",
                 fisher: str = "empirical", likelihood: str | None = None,
                 output_to_logits: Callable[[Any], torch.Tensor] | None = None, kl_clip: float | None = 1e-3,
                 stale_statistics: StaleStatistics | None = None, exclude: Iterable[nn.Module | type] = (),
                 linear_variant: str = EXPAND, l2: float = 0.0, grad_scaler: Any = None,
                 low_rank_inverse: bool = True, factor_dtype: torch.dtype | None = None,
                 comm: Communicator | None = None, params: Iterable[torch.Tensor] | None = None) -> None:
        if not callable(damping) and not 0 < damping < math.inf:
            raise ValueError(f"Invalid damping: {damping}; use a positive finite float or a callable step -> float "
                             "(an infinite damping turns K-FAC into plain SGD scaled by 1/damping).")
        if not 0.0 < factor_decay <= 1.0:
            raise ValueError(f"Invalid factor_decay: {factor_decay}; use a value in (0, 1] (1 = fresh statistics).")
        for name, value in (("factor_update_interval", factor_update_interval),
                            ("inverse_update_interval", inverse_update_interval)):
            if not callable(value) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Invalid {name}: {value!r}; use a positive int or a callable step -> int.")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {kl_clip}; use a positive float or None to disable.")
        if not l2 >= 0:
            raise ValueError(f"Invalid l2: {l2}; use a non-negative float.")
        if stale_statistics is not None and not isinstance(stale_statistics, StaleStatistics):
            raise TypeError("stale_statistics must be a StaleStatistics policy, got "
                            f"{type(stale_statistics).__name__}.")
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"Invalid factor_dtype: {factor_dtype}; use torch.float32, torch.float64 or None "
                             "(the model's precision).")
        if likelihood is not None and parse_enum(Fisher, fisher, "fisher") is Fisher.EMPIRICAL:
            raise ValueError(f"likelihood={likelihood!r} has no effect with fisher='empirical' (the output statistics "
                             "come from the training loss); pass fisher='mc' to sample labels from it, or drop "
                             "likelihood.")
        exclude = tuple(exclude)
        for entry in exclude:
            if not (isinstance(entry, (nn.Module, str)) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
                raise TypeError(f"Invalid exclude entry {entry!r}; use modules (model.fc), qualified module names "
                                "('fc', 'encoder.0') or module types (nn.Embedding).")
        if linear_variant not in ("expand", "reduce"):
            raise ValueError(f"Invalid linear_variant: {linear_variant!r}. Supported: ('expand', 'reduce').")
        self.damping = damping
        self.factor_decay = factor_decay
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.inverse_method: inv.InverseMethod = inv.parse_inverse_method(inverse_method)
        self.fisher: Fisher = parse_enum(Fisher, fisher, "fisher")
        self.likelihood: Likelihood = parse_enum(Likelihood, likelihood or Likelihood.CATEGORICAL.value, "likelihood")
        self.output_to_logits = output_to_logits
        self.kl_clip = kl_clip
        self.stale_statistics = stale_statistics
        self.exclude = tuple(exclude)
        self.linear_variant = linear_variant
        self.l2 = l2
        self.low_rank_inverse = low_rank_inverse
        self.factor_dtype = factor_dtype
        self._exact_damping_in_fp64 = factor_dtype is None
        self.comm: Communicator = comm if comm is not None else Communicator()
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
        # (id(block), statistic) known (on the host) to hold a finite estimate / found without one at a refresh
        self._known_estimated: set[tuple[int, str]] = set()
        self._unestimated: set[tuple[int, str]] = set()
        self._params = None if params is None else list(params)
        if module is not None:
            self.bind(module)

    # ------------------------------------------------------------------ binding and teardown
    def set_communicator(self, comm: Communicator) -> None:
        """Install the communicator (the Lightning layer does this at setup under DDP)."""
        self.comm = comm
        self._comm_injected = True
        if self.capture is not None and comm.is_distributed:
            self._keep_low_rank_rows(set())  # the low-rank inverse is single-process only

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
        params = list(params) if params is not None else self._params
        allowed = None if params is None else {id(p) for p in params}
        if self.factor_dtype is None:
            weights = [p for p in module.parameters() if p.is_floating_point()]
            self.factor_dtype = torch.float64 if weights and weights[0].dtype == torch.float64 else torch.float32
        if (self.inverse_method is inv.InverseMethod.EIGEN and self.factor_dtype == torch.float32
                and not self._exact_damping_in_fp64
                and not callable(self.damping) and self.damping < 1e-3):
            warnings.warn(f"inverse_method='eigen' with damping {self.damping:g} < 1e-3 and fp32 factors: the "
                          "factors' rounding (~1e-7 of their norm) exceeds the damping; pass "
                          "factor_dtype=torch.float64.", UserWarning, stacklevel=3)
        excluded_types = tuple(t for t in self.exclude if isinstance(t, type))
        named = dict(module.named_modules())
        ids = {id(sub) for sub in named.values()}
        unknown = [e for e in self.exclude if (isinstance(e, str) and e not in named)
                   or (isinstance(e, nn.Module) and id(e) not in ids)]
        if unknown:
            shown = [e if isinstance(e, str) else type(e).__name__ + " (a module not in the model)" for e in unknown]
            raise ValueError(f"exclude lists {shown}, not in {type(module).__name__}: exclude that model's own "
                             f"modules or their qualified names ({', '.join(repr(n) for n in list(named)[1:8])}, ...).")
        excluded_modules = [named[e] if isinstance(e, str) else e for e in self.exclude if not isinstance(e, type)]
        excluded = {id(sub) for m in excluded_modules for sub in m.modules()}
        # nn.MultiheadAttention uses out_proj's weight without calling out_proj: its hooks would never fire
        attention_out = {id(m.out_proj): m for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
        blocks, unsupported, seen, inside = [], [], {}, set()
        for name, sub in module.named_modules():
            own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            skip = id(sub) in excluded or id(sub) in inside or (excluded_types and isinstance(sub, excluded_types))
            if not own or skip:
                continue
            if allowed is not None and not all(id(p) in allowed for p in own):
                continue
            label = name or "<root>"
            parent = attention_out.get(id(sub))
            if parent is not None:  # the attention layer got no block (excluded or unsupported): nor does out_proj
                if not (id(parent) in excluded or (excluded_types and isinstance(parent, excluded_types))):
                    unsupported.append(f"{label} ({type(sub).__name__}, used by its MultiheadAttention without a "
                                       "forward call)")
                continue
            block = make_block(sub, name or type(sub).__name__, self.factor_dtype, self.linear_variant)
            if block is None or not {id(p) for p in own} <= {id(p) for p in block.params}:
                unsupported.append(f"{label} ({type(sub).__name__})")
                continue
            frozen = [n for n, p in (("weight", block.weight), ("bias", block.bias)) if p is not None
                      and not p.requires_grad]
            if frozen or not all(p.requires_grad for p in block.params):
                # K-FAC preconditions a layer's parameters jointly: one without a gradient leaves none to apply
                unsupported.append(f"{label} ({type(sub).__name__}, frozen {' and '.join(frozen) or 'parameters'})")
                continue
            # A block that owns its submodules' parameters too (nn.MultiheadAttention's out_proj) covers them.
            children = {id(p) for p in block.params} - {id(p) for p in own}
            inside.update(id(m) for m in sub.modules() if m is not sub and
                          {id(p) for p in m.parameters(recurse=False)} <= children)
            shared = [seen[id(p)] for p in block.params if id(p) in seen]
            if shared:  # a parameter of two layers: one block for both (tied embeddings), or the plain update
                other = next(b for b in blocks if b.name == shared[0])
                blocks = [b for b in blocks if b is not other]
                block = make_shared_block(other, block)
                if block is None:
                    unsupported.append(f"{label} ({type(sub).__name__}, shares a parameter with {shared[0]})")
                    continue
            seen.update({id(p): block.name for p in block.params})
            blocks.append(block)
        if not blocks:
            supported = ", ".join(t.__name__ for t in BLOCK_TYPES)
            raise ValueError(f"{type(module).__name__} has no layer K-FAC supports ({supported}) among the "
                             "optimized, non-excluded parameters; use a first-order optimizer.")
        if unsupported:
            layers = "1 layer" if len(blocks) == 1 else f"{len(blocks)} layers"
            warnings.warn(f"K-FAC preconditions {layers}; these get the plain momentum-SGD update: "
                          f"{', '.join(unsupported)}.", UserWarning, stacklevel=3)
        interval = int(_resolve(self.factor_update_interval, 0))
        for block in blocks:
            block.interval = dict.fromkeys(block.stat_names, interval)
            method = block.inverse_type(self.inverse_method)
            if (self._exact_damping_in_fp64 and method.exact_damping
                    and (callable(self.damping) or self.damping < method.fp32_factors_from)):
                block.factor_dtype = torch.float64
        self.module = module
        self.blocks = blocks
        self.capture = Capture(blocks, module, fisher=self.fisher, likelihood=self.likelihood,
                               output_to_logits=self.output_to_logits, on_statistic=self._reduce)
        self.capture.grad_scaler = self._grad_scaler
        self.skipped_refreshes = self.skipped_refreshes.to(blocks[0].weight.device)
        self._plan_captures()

    def remove_hooks(self) -> None:
        """Remove every capture hook (teardown). The preconditioner still applies its last inverses."""
        if self.capture is not None:
            self.capture.remove()

    def _reduce(self, statistic: torch.Tensor | inv.DeferredGram, symmetric: bool) -> None:
        self._check_communicator()
        # deferred: one process (low-rank), nothing to average; without reduce_in_hooks: at step time, by block
        if self.comm.reduce_in_hooks and not isinstance(statistic, inv.DeferredGram):
            self.comm.reduce_factors([statistic], symmetric=symmetric)

    def _check_communicator(self) -> None:
        """Refuse to run on several ranks with the single-process communicator (ranks would drift apart).

        Runs at the first capture and the first step. Under Lightning, ``KFACCallback`` (which every
        Trainer has) injects the communicator at ``on_fit_start``; anyone else injects it.
        """
        if self._comm_injected or self._comm_checked:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"K-FAC runs in a process group of {dist.get_world_size()} ranks with no communicator, so each rank "
                "would keep its own curvature. Inject one: pre.set_communicator(default_communicator()) (from "
                "lightning_lbo.optim.kfac.distributed; for KFAC, opt.preconditioner). With Lightning, "
                "lightning_lbo.callbacks.KFACCallback does this: install lightning_lbo (pip install -e .: its "
                "entry point adds the callback to every Trainer) or pass callbacks=[KFACCallback()].")
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

        Read only: the tensors are replaced, never modified, at the next refresh.
        """
        return dict(self.block(layer).factors)

    def inverse(self, layer: Layer) -> inv.BlockInverse | None:
        """The inverse in use for ``layer`` (``None`` before the first inversion, or on a non-owner rank
        when owners precondition); ``inverse(layer).apply(grad_matrix, damping)`` preconditions."""
        return self.block(layer).inverse

    # ------------------------------------------------------------------ step
    def current_damping(self) -> float:
        damping = float(_resolve(self.damping, self.steps))
        if callable(self.damping) and not 0 < damping < math.inf:  # a host float: the check costs no sync
            raise ValueError(f"damping({self.steps}) returned {damping}; a damping schedule must return positive "
                             "finite floats.")
        return max(damping, self.l2)

    def _plan_captures(self) -> None:
        """Arm the hooks for the coming step (host-side ints only)."""
        self._due = {id(b): {s for s, due in b.next_due.items() if due <= self.steps} for b in self.blocks}
        low_rank = (self.low_rank_inverse and self.factor_decay == 1.0 and not self.comm.is_distributed
                    and self.inverse_method is inv.InverseMethod.CHOLESKY)
        keep_rows = {id(b) for b in self.blocks if b.low_rank_capable} if low_rank else set()
        self.capture.begin(self._due, keep_rows)
        self._keep_low_rank_rows(keep_rows)

    def _keep_low_rank_rows(self, keep_rows: set[int]) -> None:
        """Keep the A rows of these blocks for the low-rank inverse, and defer their A Gram.

        A refreshed A then stays in rows until a dense factor is read (:attr:`CurvatureBlock.factors`).
        Stale statistics compare each new factor with the last one densely, so they keep the Gram.
        """
        self.capture.keep_rows = keep_rows
        for block in self.blocks:
            block.defer_low_rank_gram = id(block) in keep_rows and self.stale_statistics is None

    def discard_pending(self) -> None:
        """Drop statistics captured since the last step (e.g. after a step skipped by the AMP scaler)."""
        if self.capture is not None:
            self.capture.discard()

    def run_mc_backward(self, logits: torch.Tensor) -> None:
        """Run the sampled-label backward for the current forward now (if the model's output is not the logits).

        Call it before the training backward, with the logits computed by the current forward.
        """
        self.capture.run_mc_backward(logits)

    def _totals(self, block: CurvatureBlock, captured: Captured) -> list[tuple[str, torch.Tensor | inv.DeferredFactor]]:
        """Per-example-scaled statistics of one block (the scaling convention of :mod:`.blocks`)."""
        n = max(captured.examples, 1)
        out = []
        for stat, parts in captured.sums.items():
            if any(isinstance(p, inv.DeferredGram) for p in parts):
                if captured.rows and all(isinstance(p, inv.DeferredGram) for p in parts):
                    out.append((stat, inv.DeferredFactor(parts, n)))  # rows of a low-rank A: Gram built if read
                    continue
                parts = [inv.dense(p) for p in parts]  # a micro-batch's rows were not kept: no low-rank A
            total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            if stat in block.input_stats or self.fisher is Fisher.MC:
                total = total / n  # input statistics; sampled-label gradients are already per example
            else:
                total = total * n  # empirical: (N dL/dy)(N dL/dy)^T / N
            out.append((stat, total))
        return out

    def _warn_missing(self, missing: list[str]) -> None:
        if self._warned_missing or not missing:
            return
        self._warned_missing = True
        if self.fisher is Fisher.MC:
            fix = (f"with fisher='mc' the sampled-label backward starts from the output of the module K-FAC is "
                   f"bound to ({type(self.module).__name__}), whose forward was not called (e.g. training_step "
                   "calls self.net(x)). Build K-FAC on the module that returns the logits (KFAC(self.net, ...)), "
                   "or call preconditioner.run_mc_backward(logits) before the backward")
        else:
            fix = "their outputs received no gradient; exclude them (exclude=[...]) if they do not reach the loss"
        warnings.warn(f"K-FAC captured no output-gradient statistic for {missing} on a refresh step: {fix}. "
                      "These layers keep their previous (initially identity) factor.", RuntimeWarning, stacklevel=4)

    def _agree_on_captures(self, captured: dict[int, Captured]) -> dict[int, Captured]:
        """Make every rank commit the same blocks' statistics (rank-dependent control flow: routing, LayerDrop).

        One small collective per refresh step: per (block, statistic), the minimum and maximum over ranks
        of the number of captured sums. Reducing at step time, a block that captured a statistic on some
        ranks only is skipped on every rank this step (retried at the next step). Reducing from the hooks
        (positional: the sums were already averaged in hook order), any difference raises, naming the layers.
        """
        keys = [(block, stat) for block in self.blocks for stat in block.stat_names]
        counts = [len(captured[id(b)].sums.get(stat, ())) if id(b) in captured else 0 for b, stat in keys]
        flags = torch.tensor(counts + [-c for c in counts], dtype=torch.float32, device=self.blocks[0].weight.device)
        agreed = self.comm.all_min(flags).tolist()  # host sync on refresh steps only
        low, high = agreed[:len(keys)], [-v for v in agreed[len(keys):]]
        if self.comm.reduce_in_hooks:
            differ = list(dict.fromkeys(b.name for (b, _), lo, hi in zip(keys, low, high, strict=True) if lo != hi))
            if differ:
                raise RuntimeError(
                    f"K-FAC: layers {differ} captured statistics a different number of times on different ranks "
                    "(rank-dependent control flow), but this communicator reduces them from the hooks, in hook "
                    "order, so they were mixed. Use a communicator with reduce_in_hooks=False (KFACDDPStrategy "
                    "does with find_unused_parameters=True), or run the same layers on every rank.")
            return captured
        partial_blocks = list(dict.fromkeys(b for (b, _), lo, hi in zip(keys, low, high, strict=True)
                                            if lo == 0 and hi > 0))
        if partial_blocks:
            if not self._warned_partial:
                self._warned_partial = True
                warnings.warn(f"K-FAC: layers {[b.name for b in partial_blocks]} ran on some ranks only on a refresh "
                              "step (rank-dependent control flow); their statistics are skipped on every rank and "
                              "refreshed at the next step where every rank runs them.", RuntimeWarning, stacklevel=4)
            for block in partial_blocks:
                captured.pop(id(block), None)
        return captured

    def _commit_statistics(self, keep: torch.Tensor | None) -> None:
        """Turn captured sums into factors (running average), skipping non-finite ones on every rank."""
        self.comm.wait()
        captured = self.capture.collect()
        if self.comm.is_distributed and any(self._due.values()):  # a refresh step (the same on every rank)
            captured = self._agree_on_captures(captured)
        if not captured:
            return
        news: list[tuple[CurvatureBlock, str, torch.Tensor | inv.DeferredFactor]] = []
        rows: dict[tuple[int, str], tuple[torch.Tensor, int]] = {}
        missing = []
        for block in self.blocks:
            record = captured.get(id(block))
            if record is None:
                continue
            if block.output_stat in self._due[id(block)] and block.output_stat not in record.sums:
                missing.append(block.name)
            order = block.stat_names.index  # the same order on every rank, whatever order the hooks ran in
            news.extend((block, stat, total) for stat, total in sorted(self._totals(block, record),
                                                                       key=lambda item: order(item[0])))
            n = max(record.examples, 1)
            if record.rows and "A" in record.sums:
                raw = torch.cat(record.rows, dim=1) if len(record.rows) > 1 else record.rows[0]
                rows[id(block), "A"] = (block.with_ones(raw), n)
            if record.g_rows and block.output_stat in record.sums:
                raw = torch.cat(record.g_rows, dim=1) if len(record.g_rows) > 1 else record.g_rows[0]
                # G = n W^T W (empirical) or W^T W / n (sampled labels, see _totals): as U^T U / n
                rows[id(block), block.output_stat] = (raw * n if self.fisher is Fisher.EMPIRICAL else raw, n)
        self._warn_missing(missing)
        if not news:
            return
        if self.comm.is_distributed and not self.comm.reduce_in_hooks:
            # every rank holds the same (block, statistic) list here (agreed above): reduce in that order, in
            # one call per symmetry (a synchronous communicator then sends full buckets, not one per statistic)
            for symmetric in (True, False):
                same = [total for block, stat, total in news if bool(block.symmetric(stat)) is symmetric]
                if same:
                    self.comm.reduce_factors(same, symmetric=symmetric)
            self.comm.wait()
        finite = torch.stack([t.finite() if isinstance(t, inv.DeferredFactor) else torch.isfinite(t).all()
                              for _, _, t in news])
        if keep is not None:
            finite = finite & keep.to(finite.device)
        ok = self.comm.all_min(finite.float()) > 0
        self.skipped_refreshes += (~ok).sum().to(self.skipped_refreshes.device)
        decay, rel = self.factor_decay, {}
        for j, (block, stat, new) in enumerate(news):
            old = block.stored_factors.get(stat)
            if isinstance(new, inv.DeferredFactor):  # fresh (decay 1) low-rank A: this statistic where ok, else old
                previous = partial(block.identity_factor, stat) if old is None else old
                block.set_factor(stat, new.committed(ok[j], previous))
            else:
                if old is None:
                    old = block.identity_factor(stat)
                else:
                    old = inv.dense(old)
                    if self.stale_statistics is not None:
                        rel[j] = StaleStatistics.relative_change(new, old)
                mixed = new
                if decay != 1.0 and stat in block.stored_factors:
                    # the identity placeholder of a skipped first refresh is not an estimate: no average with it
                    mixed = torch.where(block.estimated[stat], torch.lerp(old, new, decay), new)
                block.set_factor(stat, torch.where(ok[j], mixed, old))
            block.estimated[stat] = block.estimated[stat] | ok[j]
            block.refreshes[stat] += 1
            # the rows describe a factor only when it is this fresh statistic; a refresh that is not committed
            # (non-finite, or a step the optimizer skips) keeps the old factor, and its rows are made NaN
            # (on the device) so that they fail the Woodbury inverse, which then uses the dense old factor
            low_rank = rows.get((id(block), stat))
            if low_rank is not None:
                block.low_rank[stat] = (torch.where(ok[j], low_rank[0], float("nan")), low_rank[1])
                block.low_rank_versions[stat] = block.versions[stat]
            else:
                block.low_rank.pop(stat, None)
        self._update_intervals(news, ok, rel)
        self._retry_unestimated(news)

    def _retry_unestimated(self, news) -> None:
        """A statistic with no finite estimate yet (its first refreshes were skipped: a bad first batch) is
        refreshed again at the next step, not one interval later (K-FAC would run on identity placeholders,
        plain SGD, meanwhile); once it has one, its block is re-inverted at once.

        One host sync per refresh step, only until every statistic has had its first finite estimate (the
        host remembers which have; after a checkpoint load it asks once more).
        """
        pending = [(block, stat) for block, stat, _ in news if (id(block), stat) not in self._known_estimated]
        if not pending:
            return
        flags = torch.stack([block.estimated[stat] for block, stat in pending]).tolist()
        for (block, stat), estimated in zip(pending, flags, strict=True):
            key = (id(block), stat)
            if estimated:
                self._known_estimated.add(key)
                if key in self._unestimated:  # its inverse was built from the placeholder: rebuild it now
                    self._unestimated.discard(key)
                    block.owner, block.restored_source = None, None
            else:
                self._unestimated.add(key)
                block.next_due[stat] = self.steps + 1

    def _update_intervals(self, news, ok: torch.Tensor, rel: dict[int, torch.Tensor]) -> None:
        base = max(1, int(_resolve(self.factor_update_interval, self.steps)))
        policy = self.stale_statistics
        if policy is None:
            for block, stat, _ in news:
                block.interval[stat] = base
                block.next_due[stat] = self.steps + base
            return
        stable_flags = [(rel[j] < policy.threshold) & ok[j] if j in rel else
                        torch.zeros((), dtype=torch.bool, device=ok.device) for j in range(len(news))]
        stable = self.comm.all_min(torch.stack(stable_flags).float()).tolist()  # one sync per refresh step
        for j, ((block, stat, _), flag) in enumerate(zip(news, stable, strict=True)):
            if j in rel:
                block.interval[stat] = policy.next_interval(block.interval[stat], flag > 0)
            block.next_due[stat] = self.steps + block.interval[stat]

    def _inverse_job(self, block: CurvatureBlock, damping: float) -> tuple:
        """``(block, method class, source factors, damping, storage dtype)`` of the inverse to compute now."""
        restored = block.restored_source
        if restored is not None:  # after load_state_dict: rebuild the inverse the checkpointed run used
            source, damping, _, _ = restored
        else:
            source = dict(block.stored_factors)  # a deferred A stays deferred: the Woodbury inverse reads its rows
            for stat, (low_rows, n) in block.low_rank.items():
                if block.low_rank_versions[stat] == block.versions[stat] and not self.comm.is_distributed:
                    rows_key, n_key = inv.LOW_RANK_KEYS[stat]
                    source.update({rows_key: low_rows, n_key: n})
            if any(rows_key not in source and isinstance(source.get(stat), inv.DeferredFactor)
                   for stat, (rows_key, _) in inv.LOW_RANK_KEYS.items()):
                source = inv.dense_factors(source)
        method = block.inverse_type(self.inverse_method)
        if any(rows_key in source for rows_key, _ in inv.LOW_RANK_KEYS.values()):
            method = inv.WoodburyKronecker
        return block, method, source, damping, method.storage_dtype(damping, block.factor_dtype)

    def _update_inverses(self) -> None:
        due = self.steps % max(1, int(_resolve(self.inverse_update_interval, self.steps))) == 0
        damping = self.current_damping()
        for block in self.blocks:
            restored = block.restored_source
            if restored is not None and due and (restored[2] or block.versions != restored[3]):
                # the checkpointed run re-inverts here (its inverse was older than its factors, or they were
                # refreshed since the checkpoint): invert the current factors, as it did
                block.restored_source = None
        todo = [block for block in self.blocks if block.captured
                and (block.owner is None or (due and not block.inverse_is_current))]
        if not todo:
            return
        jobs = [self._inverse_job(block, damping) for block in todo]
        owners = self.comm.assign([block.cost() for block in todo])
        rank = self.comm.rank
        mine = [job for job, owner in zip(jobs, owners, strict=True) if owner == rank]
        if mine:
            inverses, failed = inv.invert_with_fallback(mine)
            self.inverse_fallbacks += len(failed)
            for (block, *_), inverse in zip(mine, inverses, strict=True):
                block.inverse = inverse
        for (block, method, source, damp, dtype), owner in zip(jobs, owners, strict=True):
            restored = block.restored_source
            block.owner = owner
            block.inverse_source, block.inverse_damping = source, damp
            if restored is None:
                block.inverse_versions = dict(block.versions)
            else:  # built from the factors at load: a refresh since then (this step's) leaves it out of date
                block.inverse_versions = {s: -1 for s in block.versions} if restored[2] else dict(restored[3])
            block.restored_source = None
            if not self.comm.is_distributed:
                continue
            if self.precondition_on_owner_only:
                if owner != rank:
                    block.inverse = None
                continue
            if owner != rank:
                block.inverse = method.receiver(source, dtype)
            self.comm.broadcast(block.inverse.tensors(), src=owner, symmetric=block.inverse.symmetric_flags())

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
        self._commit_statistics(keep)
        self._update_inverses()
        self._precondition(lr)
        self.steps += 1
        self._plan_captures()

    def _precondition(self, lr: float | None) -> None:
        damping = self.current_damping()
        work = [b for b in self.blocks if b.owner is not None and all(p.grad is not None for p in b.params)]
        grads, precond, scales = [], [], []
        owners_only = self.precondition_on_owner_only
        for block in work:
            g = block.grad_matrix()
            if self.l2 > 0:
                g = g + self.l2 * block.param_matrix()
            scale = None
            if owners_only:
                p = block.inverse.apply(g, damping) if block.owner == self.comm.rank else torch.empty_like(g)
                self.comm.broadcast([p], src=block.owner)
            else:
                p, scale = block.inverse.apply_unscaled(g, damping)  # P = scale * p
            grads.append(g)
            precond.append(p)
            scales.append(scale)
        unscaled = [p for p, scale in zip(precond, scales, strict=True) if scale is None]
        if self.kl_clip is not None and precond:
            dots = [torch.vdot(p.reshape(-1), g.reshape(-1)) for p, g in zip(precond, grads, strict=True)]
            vg = torch.stack([d if scale is None else d * scale for d, scale in zip(dots, scales, strict=True)]).sum()
            nu = torch.sqrt(self.kl_clip / (lr ** 2 * vg.abs().clamp_min(1e-30))).clamp(max=1.0)
            nu = torch.where(torch.isfinite(nu), nu, torch.ones_like(nu))
            if unscaled:
                torch._foreach_mul_(unscaled, nu)
            scales = [None if scale is None else scale * nu for scale in scales]
            self.last_kl_clip_factor = nu
        scaled = [(p, scale) for p, scale in zip(precond, scales, strict=True) if scale is not None]
        if scaled:
            torch._foreach_mul_([p for p, _ in scaled], [scale for _, scale in scaled])
        for block, p in zip(work, precond, strict=True):
            block.set_grad(p)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Factors, schedules, counters, and what the current inverses were built from.

        Inverses are not saved: :meth:`load_state_dict` rebuilds them from exactly the factors (and
        low-rank rows) and damping the checkpointed run used, so a resume continues bit for bit.
        """
        blocks = []
        for block in self.blocks:
            factors = block.factors  # dense: a deferred low-rank A's Gram is built (checkpoints hold factors)
            source = {s: inv.dense(t) for s, t in (block.inverse_source or {}).items()}
            entry = {"name": block.name, "type": block.description, "factors": dict(factors),
                     "interval": dict(block.interval), "next_due": dict(block.next_due),
                     "refreshes": dict(block.refreshes), "inverse_damping": block.inverse_damping,
                     "estimated": {stat: flag.clone() for stat, flag in block.estimated.items()},
                     # factors refreshed since the last inversion (the others are the current ones)
                     "inverse_factors": {s: t for s, t in source.items() if t is not factors.get(s)},
                     # rows of current low-rank factors: the next inversion uses them (Woodbury), as after a refresh
                     "low_rank": {s: (rows, n) for s, (rows, n) in block.low_rank.items()
                                  if block.low_rank_versions.get(s) == block.versions[s]}}
            blocks.append(entry)
        return {"steps": self.steps, "blocks": blocks, "skipped_refreshes": self.skipped_refreshes.clone(),
                "inverse_fallbacks": self.inverse_fallbacks}

    def _check_schedule(self, block: CurvatureBlock, entry: dict[str, Any], steps: int) -> None:
        """A checkpointed schedule must be one this run could have written: positive int intervals (at most
        ``stale_statistics.max_interval``), each ``next_due`` at most one interval after the checkpoint's step
        (``next_due=1e9`` would stop refreshing for good)."""
        intervals, next_due = entry.get("interval", {}), entry.get("next_due", {})
        policy = self.stale_statistics
        for stat in block.stat_names:
            interval, due = intervals.get(stat, block.interval[stat]), next_due.get(stat, steps)
            where = f"K-FAC checkpoint: layer {block.name!r}, statistic {stat!r}"
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise ValueError(f"{where} has interval {interval!r}; a refresh interval is a positive int. "
                                 "The checkpoint is corrupt: resume from an earlier one.")
            if policy is not None and interval > policy.max_interval:
                raise ValueError(f"{where} has interval {interval} > stale_statistics.max_interval="
                                 f"{policy.max_interval}; raise max_interval to resume this run, or resume from "
                                 "another checkpoint.")
            if not isinstance(due, int) or isinstance(due, bool) or due > steps + interval:
                raise ValueError(f"{where} has next_due {due!r}, more than its interval {interval} after the "
                                 f"checkpoint's step {steps}: K-FAC would not refresh it again. The checkpoint is "
                                 "corrupt: resume from an earlier one.")

    def _check_entry(self, block: CurvatureBlock, entry: dict[str, Any]) -> bool:
        """Validate a checkpointed block: wrong shapes raise; non-finite factors reset it (returns False)."""
        shapes = block.factor_shapes()
        saved = list(entry.get("factors", {}).items())
        saved += [(k, v) for k, v in entry.get("inverse_factors", {}).items() if k in block.stat_names]
        for stat, tensor in saved:
            if stat not in shapes or tuple(tensor.shape) != shapes[stat]:
                raise ValueError(f"K-FAC checkpoint: layer {block.name!r} has {stat} of shape "
                                 f"{tuple(getattr(tensor, 'shape', ()))}, the model's needs "
                                 f"{shapes.get(stat)}; the checkpoint is from another model or configuration.")
        for stat, (rows, _) in entry.get("low_rank", {}).items():
            if stat not in shapes or rows.dim() != 3 or rows.shape[-1] != shapes[stat][-1]:
                raise ValueError(f"K-FAC checkpoint: layer {block.name!r} has low-rank rows of {stat} of shape "
                                 f"{tuple(rows.shape)}, the model's need [groups, r, {shapes.get(stat, (None,))[-1]}]; "
                                 "the checkpoint is from another model or configuration.")
        if all(bool(torch.isfinite(t).all()) for _, t in saved):
            return True
        warnings.warn(f"K-FAC checkpoint: layer {block.name!r} has non-finite factors; its statistics are reset "
                      "and re-estimated at the next step (the running average would never recover from NaN).",
                      RuntimeWarning, stacklevel=3)
        return False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Factors of the wrong shape raise ``ValueError`` naming the layer;
        a layer with non-finite factors is reset (statistics re-estimated at the next step) with a warning."""
        if self.module is None:
            raise RuntimeError("Bind the preconditioner to its module before load_state_dict.")
        entries = state.get("blocks", [])
        names = [block.name for block in self.blocks]
        if [e["name"] for e in entries] != names:
            raise ValueError(f"K-FAC checkpoint layers {[e['name'] for e in entries]} do not match the model's "
                             f"{names}.")
        steps = state.get("steps", 0)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"K-FAC checkpoint: steps {steps!r} is not a non-negative int; the checkpoint is corrupt.")
        for block, entry in zip(self.blocks, entries, strict=True):
            self._check_schedule(block, entry, steps)
        valid = [self._check_entry(block, entry) for block, entry in zip(self.blocks, entries, strict=True)]
        self.steps = steps
        skipped = state.get("skipped_refreshes", torch.zeros((), dtype=torch.long))
        self.skipped_refreshes = skipped.to(self.skipped_refreshes.device).clone()
        self.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
        low_rank = (self.low_rank_inverse and self.factor_decay == 1.0 and not self.comm.is_distributed
                    and self.inverse_method is inv.InverseMethod.CHOLESKY)
        for block, entry, ok in zip(self.blocks, entries, valid, strict=True):
            device, dtype = block.weight.device, block.factor_dtype
            block.factors, block.inverse, block.owner, block.low_rank = {}, None, None, {}
            block.estimated = {stat: torch.zeros((), dtype=torch.bool, device=device) for stat in block.stat_names}
            block.restored_source, block.inverse_versions = None, None
            block.interval.update(entry.get("interval", {}))
            block.refreshes.update(entry.get("refreshes", {}))
            if not ok:
                block.next_due = dict.fromkeys(block.stat_names, self.steps)
                continue
            block.next_due.update(entry.get("next_due", {}))
            for stat, tensor in entry.get("factors", {}).items():
                block.set_factor(stat, tensor.to(device=device, dtype=dtype))
                block.estimated[stat] = torch.as_tensor(entry.get("estimated", {}).get(stat, True), device=device)
            if low_rank:
                for stat, (rows, n) in entry.get("low_rank", {}).items():
                    if stat in block.stored_factors:
                        block.low_rank[stat] = (rows.to(device), int(n))
                        block.low_rank_versions[stat] = block.versions[stat]
            saved = {s: t.to(device) if isinstance(t, torch.Tensor) else t
                     for s, t in entry.get("inverse_factors", {}).items()}
            if block.captured:
                source = {**block.factors, **saved}
                stale = any(s in saved for s in block.stat_names)
                block.restored_source = (source, entry.get("inverse_damping") or self.current_damping(), stale,
                                         dict(block.versions))
        # the loaded flags are on the device: ask again at the next refresh; a statistic still on its placeholder
        # is re-inverted when first estimated, as in the checkpointed run
        self._known_estimated = set()
        self._unestimated = {(id(block), stat) for block in self.blocks for stat, flag in block.estimated.items()
                             if stat in block.stored_factors and not bool(flag)}
        self.discard_pending()
        self._plan_captures()
