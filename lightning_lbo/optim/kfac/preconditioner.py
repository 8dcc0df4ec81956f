"""KFACPreconditioner: K-FAC / SP-NGD natural-gradient preconditioning of a module's gradients.

Martens & Grosse 2015 (K-FAC), Grosse & Martens 2016 (KFC for conv), Osawa et al. 2019/2020
(large-batch K-FAC, SP-NGD: unit-wise BN Fisher, stale statistics). Formulas and the scaling
convention: :mod:`.layers`; damping and inverses: :mod:`.inverses`; stale statistics: :mod:`.stale`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_lbo.optim.kfac.comm import Communicator
from lightning_lbo.optim.kfac.fisher import Fisher, Likelihood, parse_enum
from lightning_lbo.optim.kfac.hooks import CaptureHooks, _BlockState
from lightning_lbo.optim.kfac.inverses import InverseMethod, invert_with_fallback, parse_inverse_method
from lightning_lbo.optim.kfac.layers import EXPAND, SUPPORTED, make_block
from lightning_lbo.optim.kfac.precondition import apply_inverse, inverse_template
from lightning_lbo.optim.kfac.stale import StaleStatistics

FloatSchedule = float | Callable[[int], float]
IntSchedule = int | Callable[[int], int]


def _resolve(value, step: int):
    return value(step) if callable(value) else value


class KFACPreconditioner(CaptureHooks):
    """Replace the gradients of supported layers by their K-FAC natural gradient, in place.

    Supported: ``nn.Linear`` (any input rank), ``nn.Conv2d``, ``BatchNorm1d/2d`` and ``LayerNorm``
    (unit-wise). Other parameters are left untouched (the optimizer behind applies its own update)
    and listed once in a warning. Usable in front of any optimizer::

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
        likelihood: for ``fisher="mc"``: ``"categorical"`` (logits ``[N, C, *]``) or ``"gaussian"``.
        output_to_logits: maps the root module's forward output to the logits (e.g. ``lambda o: o[0]``).
        kl_clip: scale the update so that ``lr^2 * sum <P, grad>`` is at most ``kl_clip``; ``None`` off.
        stale_statistics: a :class:`StaleStatistics` policy (per-statistic adaptive intervals) or ``None``.
        exclude: modules or module types to leave to the plain update (e.g. ``[model.fc]``, ``nn.Embedding``).
        linear_variant: ``"expand"`` or ``"reduce"`` for Linear layers with ``[N, T, in]`` inputs.
        l2: L2 regularisation folded in: ``l2 * w`` is added to each preconditioned gradient and the
            damping becomes ``max(damping, l2)``.
        grad_scaler: AMP ``GradScaler`` whose scale multiplies the output gradients (16-mixed).
        low_rank_inverse: with fresh statistics (``factor_decay=1``), the cholesky method and one
            process, apply ``(A + delta I)^{-1}`` through the Woodbury identity when the batch has
            fewer rows (examples x positions) than half of ``d_A`` (much cheaper per step on wide layers).
        comm: the :class:`Communicator` (single process: the no-op default).

    Distributed seam (all collectives go through ``self.comm``; in one process they are no-ops):

    * ``comm.reduce_factors([A_part], symmetric=True)``: in the forward hook right after a
      micro-batch's ``A`` (sum over its examples) is computed; ``comm.reduce_factors([G_part])`` /
      ``([F_part])`` in the backward tensor hook (or the MC backward) right after ``G``/``F`` is
      computed. These may be asynchronous.
    * Plain ``strategy="ddp"``: at the first capture (and the first step) a no-op communicator is
      replaced through :func:`lightning_lbo.optim.kfac.distributed.ensure_communicator` (synchronous
      averaging); ``set_communicator`` (the ``ddp_kfac`` strategy) installs a faster one up front.
    * ``comm.wait()``: at the start of :meth:`step`, before any pending statistic is read.
    * ``comm.all_min(flags)``: on every refresh step, on the "statistic finite" flags (a skipped
      refresh is skipped on every rank) and, with ``stale_statistics``, on the "statistic stable"
      flags before intervals change.
    * ``comm.assign(costs)``: on every inverse update, with ``cost = sum d^3`` of each block to invert;
      the owner computes the inverse, then ``comm.broadcast(inverse_tensors, src=owner)`` per block.
    * With ``precondition_on_owner_only = True`` inverses are not broadcast: the owner preconditions
      the block's gradient and ``comm.broadcast([P], src=owner)`` sends the result.
    """

    def __init__(self, module: nn.Module | None = None, *, damping: FloatSchedule = 1e-3,
                 factor_decay: float = 1.0, factor_update_interval: IntSchedule = 10,
                 inverse_update_interval: IntSchedule = 10, inverse_method: str = "cholesky",
                 fisher: str = "empirical", likelihood: str = "categorical",
                 output_to_logits: Callable[[Any], torch.Tensor] | None = None, kl_clip: float | None = 1e-3,
                 stale_statistics: StaleStatistics | None = None, exclude: Iterable[nn.Module | type] = (),
                 linear_variant: str = EXPAND, l2: float = 0.0, grad_scaler: Any = None,
                 low_rank_inverse: bool = True, comm: Communicator | None = None,
                 params: Iterable[torch.Tensor] | None = None) -> None:
        if not callable(damping) and not damping > 0:
            raise ValueError(f"Invalid damping: {damping}; use a positive float or a callable step -> float.")
        if not 0.0 < factor_decay <= 1.0:
            raise ValueError(f"Invalid factor_decay: {factor_decay}; use a value in (0, 1] (1 = fresh statistics).")
        for name, value in (("factor_update_interval", factor_update_interval),
                            ("inverse_update_interval", inverse_update_interval)):
            if not callable(value) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Invalid {name}: {value!r}; use a positive int or a callable step -> int.")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {kl_clip}; use a positive float or None to disable.")
        if not l2 >= 0:
            raise ValueError(f"Invalid l2: {l2}; use a non-negative float.")
        if stale_statistics is not None and not isinstance(stale_statistics, StaleStatistics):
            raise TypeError("stale_statistics must be a StaleStatistics policy, got "
                            f"{type(stale_statistics).__name__}.")
        self.damping = damping
        self.factor_decay = factor_decay
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.inverse_method: InverseMethod = parse_inverse_method(inverse_method)
        self.fisher: Fisher = parse_enum(Fisher, fisher, "fisher")
        self.likelihood: Likelihood = parse_enum(Likelihood, likelihood, "likelihood")
        self.output_to_logits = output_to_logits
        self.kl_clip = kl_clip
        self.stale_statistics = stale_statistics
        self.exclude = tuple(exclude)
        self.linear_variant = linear_variant
        self.l2 = l2
        self.grad_scaler = grad_scaler
        self.low_rank_inverse = low_rank_inverse
        #: Distributed only: precondition on the owner rank and broadcast P instead of the inverses.
        self.precondition_on_owner_only = False
        self.set_communicator(comm if comm is not None else Communicator())
        self.steps = 0
        self.module: nn.Module | None = None
        self.states: list[_BlockState] = []
        self.last_kl_clip_factor: torch.Tensor | None = None
        self.skipped_refreshes = torch.zeros((), dtype=torch.long)
        self.inverse_fallbacks = 0
        self._handles: list[Any] = []
        self._cycle_open = False
        self._capturing = False
        self._mc_targets: list[tuple[_BlockState, Any, torch.Tensor | None]] = []
        self._in_mc = False
        self._inverses_stale = True
        self._comm_checked = False
        self._params = None if params is None else list(params)
        if module is not None:
            self.bind(module)

    # ------------------------------------------------------------------ binding
    def set_communicator(self, comm: Communicator) -> None:
        """Install the communicator (the distributed strategy does this at setup).

        A communicator with ``owners_precondition = True`` switches on ``precondition_on_owner_only``.
        """
        self.comm = comm
        self.precondition_on_owner_only = bool(getattr(comm, "owners_precondition", False))

    @property
    def bound(self) -> bool:
        return self.module is not None

    def bind(self, module: nn.Module, params: Iterable[torch.Tensor] | None = None) -> None:
        """Find the supported layers of ``module`` and register the capture hooks.

        Only layers whose parameters are all in ``params`` (default: the constructor's ``params``,
        else all) and require grad get a block. Binding twice to the same module is a no-op.
        """
        if self.module is module:
            return
        if self.module is not None:
            raise RuntimeError("This KFACPreconditioner is already bound to another module; build a new one.")
        params = list(params) if params is not None else self._params
        allowed = None if params is None else {id(p) for p in params}
        excluded_ids = {id(m) for m in self.exclude if isinstance(m, nn.Module)}
        excluded_types = tuple(t for t in self.exclude if isinstance(t, type))
        unsupported, excluded_ids_sub = [], set()
        for m in self.exclude:
            if isinstance(m, nn.Module):
                excluded_ids_sub |= {id(sub) for sub in m.modules()}
        interval = _resolve(self.factor_update_interval, 0)
        for name, sub in module.named_modules():
            own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if id(sub) in excluded_ids_sub or (excluded_types and isinstance(sub, excluded_types)):
                continue
            if allowed is not None and not all(id(p) in allowed for p in own):
                continue
            block = make_block(sub, name or type(sub).__name__, self.linear_variant) \
                if isinstance(sub, SUPPORTED) else None
            if block is None or any(id(p) not in {id(q) for q in block.params} for p in own):
                unsupported.append(f"{name or '<root>'} ({type(sub).__name__})")
                continue
            self.states.append(_BlockState(block, interval))
        del excluded_ids
        if not self.states:
            supported = ", ".join(t.__name__ for t in SUPPORTED)
            raise ValueError(f"{type(module).__name__} has no layer K-FAC supports ({supported}) among the "
                             "optimized, non-excluded parameters; use a first-order optimizer.")
        if unsupported:
            warnings.warn(f"K-FAC preconditions {len(self.states)} layers; these get the plain momentum-SGD update: "
                          f"{', '.join(unsupported)}.", UserWarning, stacklevel=3)
        self.module = module
        for state in self.states:
            self._handles.append(state.block.module.register_forward_hook(partial(self._forward_hook, state)))
        self._handles.append(module.register_forward_hook(self._root_forward_hook))
        device = self.states[0].block.weight.device
        self.skipped_refreshes = self.skipped_refreshes.to(device)
        self._plan_captures()

    def _check_communicator(self) -> None:
        """Plain ``strategy="ddp"``: swap the no-op communicator for a synchronous one, once.

        Runs at the first capture (the first training forward, the same point on every rank) and at
        the first step, before any statistic is reduced.
        """
        if self._comm_checked:
            return
        self._comm_checked = True
        if type(self.comm) is Communicator:
            from lightning_lbo.optim.kfac.distributed import ensure_communicator

            ensure_communicator(self)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ step
    def current_damping(self) -> float:
        return max(float(_resolve(self.damping, self.steps)), self.l2)

    def _commit_statistics(self) -> list[tuple[_BlockState, str]]:
        """Turn pending sums into factors (running average); returns the refreshed statistics."""
        self.comm.wait()
        if not self._cycle_open:
            return []
        news: list[tuple[_BlockState, str, torch.Tensor]] = []
        fresh_rows = {}
        for st in self.states:
            n = max(st.pending_n, 1)
            if st.pending.get("A") and st.pending_rows:
                rows = torch.cat(st.pending_rows, dim=1) if len(st.pending_rows) > 1 else st.pending_rows[0]
                if 2 * rows.shape[1] <= st.block.dims[0]:
                    fresh_rows[id(st)] = {"rows": st.block.with_ones(rows),
                                          "n": torch.tensor(float(n), device=rows.device)}
            for s, parts in st.pending.items():
                if not parts:
                    continue
                total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
                if s == "A":
                    total = total / n
                elif self.fisher is Fisher.EMPIRICAL:
                    total = total * n  # per-example gradients: (N dL/dy)(N dL/dy)^T / N
                else:
                    total = total / n  # sampled-label grads are already per-example
                news.append((st, s, total))
        self.discard_pending()
        if not news:
            return []
        finite = torch.stack([torch.isfinite(t).all() for _, _, t in news]).float()
        finite = self.comm.all_min(finite)
        ok = finite > 0
        self.skipped_refreshes += (~ok).sum().to(self.skipped_refreshes.device)
        decay = self.factor_decay
        rel = []
        for j, (st, s, new) in enumerate(news):
            old = st.factors.get(s)
            if old is None:
                eye = torch.eye(new.shape[-1], device=new.device).expand_as(new)
                st.factors[s] = torch.where(ok[j], new, eye)
            else:
                if self.stale_statistics is not None:
                    rel.append(StaleStatistics.relative_change(new, old))
                st.factors[s] = torch.where(ok[j], new if decay == 1.0 else (1 - decay) * old + decay * new, old)
            st.refreshes[s] += 1
            if s == "A":  # rows describe this A only if it is the fresh statistic (a skipped refresh keeps old)
                st.rows = dict(fresh_rows.get(id(st), {}), factor=st.factors["A"]) if id(st) in fresh_rows else {}
        refreshed = [(st, s) for st, s, _ in news]
        self._update_intervals(news, ok, rel)
        return refreshed

    def _update_intervals(self, news, ok: torch.Tensor, rel: list[torch.Tensor]) -> None:
        base = max(1, int(_resolve(self.factor_update_interval, self.steps)))
        policy = self.stale_statistics
        if policy is None:
            for st, s, _ in news:
                st.interval[s] = base
                st.next_due[s] = self.steps + base
            return
        j_rel, stable_flags = 0, []
        for j, (st, s, _) in enumerate(news):
            if st.refreshes[s] > 1:
                stable_flags.append((rel[j_rel] < policy.threshold) & ok[j])
                j_rel += 1
            else:
                stable_flags.append(torch.zeros((), dtype=torch.bool, device=ok.device))
        stable = self.comm.all_min(torch.stack(stable_flags).float()).tolist()  # one sync per refresh step
        for (st, s, _), flag in zip(news, stable, strict=True):
            if st.refreshes[s] > 1:
                st.interval[s] = policy.next_interval(st.interval[s], flag > 0)
            st.next_due[s] = self.steps + st.interval[s]

    def _update_inverses(self) -> None:
        due = self.steps % max(1, int(_resolve(self.inverse_update_interval, self.steps))) == 0
        damping = self.current_damping()
        todo = []  # (state, factors to invert, damping)
        for st in self.states:
            if len(st.factors) != len(st.block.stat_names):
                continue  # not captured yet
            changed = any(st.factors[s] is not st.inverse_factors.get(s) for s in st.factors)
            restore = self._inverses_stale and bool(st.inverse_factors)  # after load_state_dict
            if (due and changed) or (st.owner is None and not restore):
                source = dict(st.factors)
                if st.rows and st.rows["factor"] is st.factors.get("A"):
                    source.update(rows=st.rows["rows"], n=st.rows["n"])
                todo.append((st, source, damping))
            elif restore:  # rebuild the inverse the checkpointed run was using
                todo.append((st, st.inverse_factors, st.inverse_damping or damping))
        self._inverses_stale = False
        if not todo:
            return
        owners = self.comm.assign([st.block.cost() for st, _, _ in todo])
        mine = [(item, o) for item, o in zip(todo, owners, strict=True) if o == self.comm.rank]
        if mine:
            inverses, failed = invert_with_fallback([st.block for (st, _, _), _ in mine],
                                                    [f for (_, f, _), _ in mine], [d for (_, _, d), _ in mine],
                                                    self.inverse_method)
            self.inverse_fallbacks += len(failed)
            for ((st, _, _), _), inv in zip(mine, inverses, strict=True):
                st.inverse = inv
        for (st, factors, damp), owner in zip(todo, owners, strict=True):
            st.owner = owner
            st.inverse_factors = factors
            st.inverse_damping = damp
            if not self.comm.is_distributed:
                continue
            if self.precondition_on_owner_only:
                if owner != self.comm.rank:
                    st.inverse = None
                continue
            if owner != self.comm.rank:
                st.inverse = inverse_template(st.block, factors, self.inverse_method)
            self.comm.broadcast(list(st.inverse.values()), src=owner)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Refresh factors/inverses when due and precondition the gradients in place.

        Args:
            lr: the learning rate of the update that follows (needed by ``kl_clip``).
        """
        if self.module is None:
            raise RuntimeError("KFACPreconditioner is not bound to a module: call bind(model) first "
                               "(with Lightning, add lightning_lbo.callbacks.KFACCallback or build KFAC(self, ...)).")
        if self.kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs the learning rate: call step(lr=...) or set kl_clip=None.")
        self._check_communicator()
        self._commit_statistics()
        self._update_inverses()
        self._precondition(lr)
        self.steps += 1
        self._plan_captures()

    def _precondition(self, lr: float | None) -> None:
        damping = self.current_damping()
        work = [st for st in self.states if st.owner is not None and all(p.grad is not None for p in st.block.params)]
        grads, precond = [], []
        rank = self.comm.rank
        for st in work:
            g = st.block.grad_matrix()
            if self.l2 > 0:
                g = g + self.l2 * _param_matrix(st.block)
            if self.precondition_on_owner_only and self.comm.is_distributed:
                p = apply_inverse(st, g, damping, self.inverse_method) if st.owner == rank else torch.empty_like(g)
                self.comm.broadcast([p], src=st.owner)
            else:
                p = apply_inverse(st, g, damping, self.inverse_method)
            grads.append(g)
            precond.append(p)
        if self.kl_clip is not None and precond:
            vg = torch.stack([torch.vdot(p.reshape(-1), g.reshape(-1))
                              for p, g in zip(precond, grads, strict=True)]).sum()
            nu = torch.sqrt(self.kl_clip / (lr ** 2 * vg.abs().clamp_min(1e-30))).clamp(max=1.0)
            nu = torch.where(torch.isfinite(nu), nu, torch.ones_like(nu))
            torch._foreach_mul_(precond, nu)
            self.last_kl_clip_factor = nu
        for st, p in zip(work, precond, strict=True):
            st.block.set_grad(p)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Factors, intervals, counters (inverses are recomputed on load from the saved factors)."""
        blocks = []
        for st in self.states:
            entry = {"name": st.block.name, "factors": dict(st.factors), "interval": dict(st.interval),
                     "next_due": dict(st.next_due), "refreshes": dict(st.refreshes),
                     "inverse_damping": st.inverse_damping}
            # Factors refreshed since the last inversion: keep those the current inverse was built from.
            entry["inverse_factors"] = {s: t for s, t in st.inverse_factors.items() if t is not st.factors.get(s)}
            blocks.append(entry)
        return {"steps": self.steps, "blocks": blocks, "skipped_refreshes": self.skipped_refreshes.clone(),
                "inverse_fallbacks": self.inverse_fallbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.module is None:
            raise RuntimeError("Bind the preconditioner to its module before load_state_dict.")
        blocks = state.get("blocks", [])
        names = [st.block.name for st in self.states]
        if [b["name"] for b in blocks] != names:
            raise ValueError(f"K-FAC checkpoint layers {[b['name'] for b in blocks]} do not match the model's {names}.")
        self.steps = int(state.get("steps", 0))
        self.skipped_refreshes = state.get("skipped_refreshes", torch.zeros((), dtype=torch.long)).to(
            self.skipped_refreshes.device).clone()
        self.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
        for st, entry in zip(self.states, blocks, strict=True):
            device = st.block.weight.device
            st.factors = {s: t.to(device) for s, t in entry.get("factors", {}).items()}
            st.interval.update(entry.get("interval", {}))
            st.next_due.update(entry.get("next_due", {}))
            st.refreshes.update(entry.get("refreshes", {}))
            saved = {s: t.to(device) for s, t in entry.get("inverse_factors", {}).items()}
            st.inverse_factors = {**{s: st.factors[s] for s in st.factors}, **saved}
            st.inverse_damping = entry.get("inverse_damping")
            st.inverse, st.owner = None, None
        self._inverses_stale = True  # the next step recomputes the inverses from inverse_factors
        self.discard_pending()
        self._plan_captures()


def _param_matrix(block) -> torch.Tensor:
    """The block's parameters in the layout of its gradient matrix (for folding L2 in)."""
    if block.kind == "unit":
        cols = [block.weight.reshape(-1).float()] + ([block.bias.reshape(-1).float()] if block.bias is not None else [])
        return torch.stack(cols, dim=1)
    g = block.groups
    w = block.weight.reshape(g, block.weight.shape[0] // g, -1).float()
    if block.bias is None:
        return w
    return torch.cat([w, block.bias.reshape(g, -1, 1).float()], dim=2)
