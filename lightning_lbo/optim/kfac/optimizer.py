"""KFAC: the K-FAC / SP-NGD preconditioner followed by momentum SGD, as a ``torch.optim.Optimizer``.

For every parameter, with ``d`` the preconditioned gradient (the plain gradient for layers K-FAC
does not support), ``lr_t`` the learning rate and ``m`` the momentum:

.. math::

    d &\\leftarrow d + \\mathrm{wd}\\, w \\quad (\\text{unless folded into the damping}) \\\\
    v &\\leftarrow m\\, v + d, \\qquad w \\leftarrow w - \\mathrm{lr}_t\\, v

This is PyTorch's SGD form, which equals Goyal et al.'s ``v <- m (lr_t / lr_{t-1}) v + lr_t d``
update *with* momentum correction. ``momentum_correction=False`` gives the uncorrected
``v <- m v + lr_t d`` instead (the factor of :func:`lightning_lbo.optim.momentum.correction_factor`).
``weight_rescaling`` (Osawa et al. 2019) clips the norm of every Linear/Conv weight to
``sqrt(2 * d_out)`` after the update.

Non-finite steps follow the package's skip contract (:mod:`lightning_lbo.optim._step_utils`): a step
whose gradients are not all finite, or one skipped on request (``skip_next_step_where``), leaves
weights, momentum buffers and K-FAC factors bit-identical and counts in ``nonfinite_skips``, decided
on the device (no host sync). The refresh schedule still advances.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lbo._dtensor import any_dtensor, local_tensor
from lightning_lbo.optim._step_utils import (
    NONFINITE_SKIPS,
    CheckedOptimizer,
    check_momentum,
    check_non_negative,
    use_foreach,
)
from lightning_lbo.optim.kfac import placement
from lightning_lbo.optim.kfac.blocks import KroneckerBlock
from lightning_lbo.optim.kfac.checkpoint import flat_block_state, nested_block_state
from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner
from lightning_lbo.optim.kfac.settings import check_keywords
from lightning_lbo.optim.momentum import MOMENTUM_BUFFER, correction_factor

#: keyword arguments ``KFAC`` passes on to :class:`KFACPreconditioner`
PRECONDITIONER_ARGUMENTS = tuple(name for name, p in inspect.signature(KFACPreconditioner).parameters.items()
                                 if p.kind is p.KEYWORD_ONLY and name != "params")

#: prefix of K-FAC's entries in the per-parameter state of each preconditioned layer's weight
KFAC_KEY = "kfac."
#: the preconditioner-wide counters written into every param group of ``state_dict()``
GROUP_COUNTERS = ("kfac_steps", "kfac_skipped_refreshes", "kfac_inverse_fallbacks", "kfac_mc_seed", "kfac_mc_draws",
                  NONFINITE_SKIPS)


def _select(keep: Tensor, value: float, otherwise: float) -> Tensor:
    """``value`` where ``keep`` else ``otherwise``, as a 0-d device tensor, exact in both cases, no sync."""
    k = keep.to(torch.float32)
    return k * value + (1.0 - k) * otherwise


def _complete(block: Any, flat: dict[str, Any]) -> dict[str, Any]:
    """A block's flat state with every key present, so that a template built before any capture (what Lightning's
    distributed checkpoint loads into: only the keys of the template are read) has them all: a factor not yet
    estimated is its identity placeholder (``refreshes.<stat>`` 0 says so), the inverse source of a current inverse
    is a copy of the factor. :func:`_trimmed` undoes both."""
    flat = dict(flat)
    for stat in block.stat_names:
        flat.setdefault(f"factor.{stat}", block.identity_factor(stat))
        if f"inverse.{stat}" not in flat:  # a copy: a checkpoint reader loads in place, into both
            flat[f"inverse.{stat}"] = flat[f"factor.{stat}"].clone()
    return flat


def _trimmed(flat: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`_complete`: drop placeholder factors (never refreshed) and inverse sources equal to the factor."""
    flat = dict(flat)
    for key in [k for k in flat if k.startswith("factor.") and k.count(".") == 1]:
        stat = key.partition(".")[2]
        source = flat.get(f"inverse.{stat}")
        if flat.get(f"refreshes.{stat}", 1) == 0:
            flat.pop(key)
            flat.pop(f"inverse.{stat}", None)
        elif isinstance(source, Tensor) and (source is flat[key] or torch.equal(source, flat[key])):
            flat.pop(f"inverse.{stat}")
    return flat


def _local_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else local_tensor(t)


def kfac_sgd(params: list[Tensor], updates: list[Tensor], bufs: list[Tensor | None], *, keep: Tensor, lr: float,
             momentum: float, momentum_scale: float = 1.0) -> None:
    """The momentum-SGD part of a KFAC step, masked by ``keep`` (0-d bool), on the device.

    ``updates`` are the (preconditioned, decayed) directions ``d``, finite; ``bufs`` the momentum
    buffers (``None``: first step, the buffer becomes ``d``; the new buffers are written into the
    caller's ``state`` by the caller). With ``keep`` False nothing changes: buffers are multiplied by
    1 and ``d`` is 0; weights move by ``0 * v``.
    """
    if momentum:
        existing = [(b, d) for b, d in zip(bufs, updates, strict=True) if b is not None]
        if existing:
            old = [b for b, _ in existing]
            torch._foreach_mul_(old, _select(keep, momentum * momentum_scale, 1.0))
            torch._foreach_add_(old, [d for _, d in existing])
        updates = [d if b is None else b for b, d in zip(bufs, updates, strict=True)]
    torch._foreach_add_(params, torch._foreach_mul(updates, _select(keep, -lr, 0.0)))


def kfac_sgd_single_tensor(params: list[Tensor], updates: list[Tensor], bufs: list[Tensor | None], *, keep: Tensor,
                           lr: float, momentum: float, momentum_scale: float = 1.0) -> None:
    """:func:`kfac_sgd` one tensor at a time (the reference the multi-tensor path is tested equal to)."""
    buffer_scale = _select(keep, momentum * momentum_scale, 1.0)
    step_scale = _select(keep, -lr, 0.0)
    for p, d, b in zip(params, updates, bufs, strict=True):
        if momentum and b is not None:
            b.mul_(buffer_scale)
            b.add_(d)
            d = b
        p.add_(d * step_scale)


class KFAC(CheckedOptimizer):
    """K-FAC natural-gradient descent with momentum.

    Args:
        params: a module (hooks are registered now: ``KFAC(self, ...)`` in ``configure_optimizers``)
            or parameters / parameter groups (bind later: ``KFACCallback`` or the ``ddp_kfac``
            strategy binds it to the LightningModule at setup).
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the (preconditioned) gradient.
        fold_weight_decay: add the L2 term *before* preconditioning and use ``max(damping, wd)`` as
            damping for preconditioned layers (Osawa et al.), instead of after.
        momentum_correction: see the module docstring.
        weight_rescaling: clip Linear/Conv weight norms to ``sqrt(2 * d_out)`` after each step.
        foreach: multi-tensor (``torch._foreach_*``) update; ``False``: one tensor at a time (the reference);
            ``None`` picks the multi-tensor path for plain tensors.
        **preconditioner_kwargs: :class:`KFACPreconditioner` arguments (``damping``,
            ``factor_decay``, ``factor_update_interval``, ``inverse_update_interval``, ``fisher``,
            ``kl_clip``, ``stale_statistics``, ``exclude``, ``factor_dtype``, ...); an unknown name
            raises ``TypeError`` listing the valid ones.

    Example::

        class Net(LightningModule):
            def configure_optimizers(self):
                return KFAC(self, lr=0.1, momentum=0.9, damping=1e-3, fisher="mc")
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, fold_weight_decay: bool = False, momentum_correction: bool = True,
                 weight_rescaling: bool = False, foreach: bool | None = None, **preconditioner_kwargs: Any) -> None:
        check_keywords("KFAC", preconditioner_kwargs, PRECONDITIONER_ARGUMENTS + tuple(
            n for n in inspect.signature(KFAC.__init__).parameters if n not in ("self", "preconditioner_kwargs")))
        module = params if isinstance(params, nn.Module) else None
        param_source = module.parameters() if module is not None else params
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_correction=momentum_correction,
                        weight_rescaling=weight_rescaling, foreach=foreach)
        super().__init__(param_source, defaults)
        self.fold_weight_decay = fold_weight_decay
        if fold_weight_decay:
            preconditioner_kwargs["l2"] = weight_decay
        all_params = [p for g in self.param_groups for p in g["params"]]
        self.preconditioner = KFACPreconditioner(None, params=all_params, **preconditioner_kwargs)
        lrs = sorted({group["lr"] for group in self.param_groups if group["params"]}, key=str)
        if self.preconditioner.kl_clip is not None and len(lrs) > 1:
            # the clip bounds lr^2 <P, g> summed over layers with one lr (group 0's, passed to the preconditioner)
            raise ValueError(f"kl_clip with parameter groups of different learning rates {lrs}: the KL clip scales "
                             "every layer with one learning rate. Use one lr for all groups, or kl_clip=None.")
        self._preconditioned: set[int] = set()
        self._rescaled: dict[int, int] = {}
        self._pending_kfac_state: dict[str, Any] | None = None
        if module is not None:
            self.bind(module)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_non_negative("learning rate", group["lr"])
        check_momentum(group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum_correction", True)
            group.setdefault("weight_rescaling", False)
            group.setdefault("foreach", None)

    def bind(self, module: nn.Module) -> None:
        """Register K-FAC's hooks on ``module``'s supported layers among this optimizer's parameters."""
        self.preconditioner.bind(module)
        blocks = self.preconditioner.blocks
        self._preconditioned = {id(p) for block in blocks for p in block.params}
        self._rescaled = {id(b.weight): b.weight.shape[0] for b in blocks if isinstance(b, KroneckerBlock)}
        if self._pending_kfac_state is not None:
            self.preconditioner.load_state_dict(self._nested(self._pending_kfac_state))
            self._pending_kfac_state = None

    @property
    def bound(self) -> bool:
        return self.preconditioner.bound

    @property
    def skipped_steps(self) -> Tensor:
        """Deprecated alias of :attr:`nonfinite_skips`."""
        warnings.warn("KFAC.skipped_steps is deprecated; read KFAC.nonfinite_skips (the counter every optimizer "
                      "of the package exposes).", DeprecationWarning, stacklevel=2)
        return self.nonfinite_skips

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        """One K-FAC step; ``closure`` (re-evaluates the loss) runs once under ``torch.enable_grad()``."""
        loss = self._evaluate_closure(closure)
        if not self.preconditioner.bound:
            raise RuntimeError("KFAC was built from parameters and is not bound to its module: call "
                               "optimizer.bind(model), or with Lightning pass callbacks=[KFACCallback()] "
                               "(lightning_lbo.callbacks), or build KFAC(self, ...) in configure_optimizers.")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            self.preconditioner.step(lr=self.param_groups[0]["lr"])
            return loss
        if any_dtensor(grads):  # sharded: the decision from whole-gradient norms, the same on every rank
            keep = self._step_keep([local_tensor(g) for g in grads], placement.whole_norms(grads))
        else:
            keep = self._step_keep(grads)
        self.preconditioner.step(lr=self.param_groups[0]["lr"], keep=keep)
        for group in self.param_groups:
            self._update_group(group, keep)
        return loss

    def _update_group(self, group: dict[str, Any], keep: Tensor) -> None:
        sharded = [p for p in group["params"] if p.grad is not None]
        if not sharded:
            return
        # sharded parameters: the update is element-wise, so it runs on each rank's local rows (plain tensors)
        params = [local_tensor(p) for p in sharded]
        grads = [local_tensor(p.grad) for p in sharded]
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        foreach = use_foreach(group.get("foreach"), params)
        zero = torch.zeros((), dtype=grads[0].dtype, device=params[0].device)
        updates = [torch.where(keep, g, zero) for g in grads]  # NaN-free, zero on a skipped step
        if wd:
            decayed = [(d, p) for d, p, whole in zip(updates, params, sharded, strict=True)
                       if not (self.fold_weight_decay and id(whole) in self._preconditioned)]
            if decayed:
                decay = _select(keep, wd, 0.0)
                if foreach:
                    torch._foreach_add_([d for d, _ in decayed], torch._foreach_mul([p for _, p in decayed], decay))
                else:
                    for d, p in decayed:
                        d.add_(p * decay)
        bufs = ([_local_or_none(self.state[p].get(MOMENTUM_BUFFER)) for p in sharded] if momentum
                else [None] * len(params))
        scale = 1.0 if group["momentum_correction"] else correction_factor(group.get("prev_lr", lr), lr,
                                                                           lr_in_buffer=False)
        update = kfac_sgd if foreach else kfac_sgd_single_tensor
        update(params, updates, bufs, keep=keep, lr=lr, momentum=momentum, momentum_scale=scale)
        if momentum:
            for p, b, d in zip(sharded, bufs, updates, strict=True):
                if b is None:  # a sharded parameter's buffer is a DTensor like it (checkpoints reshard it)
                    self.state[p][MOMENTUM_BUFFER] = placement.like_parameter(d, p)
        group["prev_lr"] = lr
        if group["weight_rescaling"]:
            self._rescale([p for p in sharded if id(p) in self._rescaled], keep, foreach)

    def _rescale(self, weights: list[Tensor], keep: Tensor, foreach: bool = True) -> None:
        if not weights:
            return
        keys = [id(w) for w in weights]
        if any_dtensor(weights):  # whole-weight norms (never per shard), then the local rows are scaled
            norms, weights, foreach = placement.whole_norms(weights), [local_tensor(w) for w in weights], False
        else:
            norms = torch._foreach_norm(weights) if foreach else [torch.linalg.vector_norm(w) for w in weights]
        k = keep.to(torch.float32)
        factors = [k * torch.clamp((2.0 * self._rescaled[key]) ** 0.5 / n.clamp_min(1e-12), max=1.0) + (1 - k)
                   for key, n in zip(keys, norms, strict=True)]
        if foreach:
            torch._foreach_mul_(weights, factors)
        else:
            for w, f in zip(weights, factors, strict=True):
                w.mul_(f)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with K-FAC's curvature twice over (the same tensors, stored once by ``torch.save``):

        * ``state["kfac"]``: :meth:`KFACPreconditioner.state_dict` (the format of every K-FAC checkpoint);
        * per preconditioned layer, its block's flat state as ``kfac.<key>`` entries of the per-parameter
          state of its weight, and the preconditioner's counters (``kfac_steps``, ...) in every param group:
          what ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps (it drops every
          other top-level entry), so Lightning's sharded checkpoints save, load and reshard the curvature.
        """
        state = super().state_dict()
        kfac = self.preconditioner.state_dict() if self.preconditioner.bound else None
        state["kfac"] = kfac
        if kfac is None:
            return state
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for block, entry in zip(self.preconditioner.blocks, kfac["blocks"], strict=True):
            i = index[id(block.weight)]
            # every key, None included: torch's full-state-dict loading fails on a non-tensor key its template
            # (this optimizer's own state_dict, before any capture) lacks
            flat = {f"{KFAC_KEY}{k}": v for k, v in _complete(block, flat_block_state(entry)).items()}
            # a new dict: the packed per-parameter state is the live one
            state["state"][i] = {**state["state"].get(i, {}), **flat, f"{KFAC_KEY}name": block.name,
                                 f"{KFAC_KEY}type": entry["type"]}
        counters = {"kfac_steps": kfac["steps"], "kfac_skipped_refreshes": int(kfac["skipped_refreshes"]),
                    "kfac_inverse_fallbacks": kfac["inverse_fallbacks"],
                    "kfac_mc_seed": kfac["mc_sampling"].get("seed"), "kfac_mc_draws": kfac["mc_sampling"].get("draws"),
                    NONFINITE_SKIPS: int(self.nonfinite_skips)}  # host reads: saving a checkpoint is not a step
        for group in state["param_groups"]:  # the packed copies, not the live groups
            group.update(counters)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`, or what ``get_optimizer_state_dict`` kept of it (the curvature then comes
        from the ``kfac.*`` per-parameter entries and the counters from the param groups), or a checkpoint
        from before either (``skipped_steps``)."""
        state_dict = dict(state_dict)
        kfac_state = state_dict.pop("kfac", None)
        legacy = state_dict.pop("skipped_steps", None)  # checkpoints before the package-wide skip counter
        if legacy is not None and NONFINITE_SKIPS not in state_dict:
            state_dict[NONFINITE_SKIPS] = legacy
        groups = state_dict.get("param_groups", [])
        if NONFINITE_SKIPS not in state_dict and groups and NONFINITE_SKIPS in groups[0]:
            state_dict[NONFINITE_SKIPS] = torch.as_tensor(groups[0][NONFINITE_SKIPS], dtype=torch.int64)
        # the per-layer curvature, out of the per-parameter state (not momentum: it must not land in self.state)
        saved_ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_param: dict[int, dict[str, Any]] = {}
        per_param = {}
        for key, entries in state_dict.get("state", {}).items():
            if isinstance(entries, dict) and any(str(k).startswith(KFAC_KEY) for k in entries):
                curvature = _trimmed({k[len(KFAC_KEY):]: v for k, v in entries.items() if str(k).startswith(KFAC_KEY)})
                if key in saved_ids and len(saved_ids) == len(params):
                    by_param[id(params[saved_ids.index(key)])] = curvature
                entries = {k: v for k, v in entries.items() if not str(k).startswith(KFAC_KEY)}
            per_param[key] = entries
        state_dict["state"] = per_param
        self._check_momentum_buffers(state_dict)
        if kfac_state is None and by_param:
            counters = groups[0] if groups else {}
            kfac_state = {"steps": counters.get("kfac_steps", 0), "blocks": by_param,
                          "skipped_refreshes": torch.as_tensor(counters.get("kfac_skipped_refreshes", 0)),
                          "inverse_fallbacks": counters.get("kfac_inverse_fallbacks", 0),
                          "mc_sampling": {k: counters[f"kfac_mc_{k}"] for k in ("seed", "draws")
                                          if counters.get(f"kfac_mc_{k}") is not None}}
        if kfac_state is not None and self.preconditioner.bound:
            # validates first: a bad entry raises before any change
            self.preconditioner.load_state_dict(self._nested(kfac_state))
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the counters are not hyperparameters: keep the live groups clean
            for key in GROUP_COUNTERS:
                group.pop(key, None)
        if kfac_state is not None and not self.preconditioner.bound:
            self._pending_kfac_state = kfac_state  # applied by bind()

    def _nested(self, kfac_state: dict[str, Any]) -> dict[str, Any]:
        """``kfac_state`` with per-parameter curvature (``blocks`` keyed by ``id`` of each block's weight, from
        :meth:`load_state_dict`) turned into the preconditioner's list of block entries (needs the blocks)."""
        blocks = kfac_state["blocks"]
        if not isinstance(blocks, dict):
            return kfac_state
        entries = []
        for block in self.preconditioner.blocks:
            flat = blocks.get(id(block.weight))
            if flat is None:
                raise ValueError(f"K-FAC checkpoint: no curvature for layer {block.name!r} (the per-parameter "
                                 f"'{KFAC_KEY}*' entries of its weight); saved layers: "
                                 f"{sorted(f.get('name') for f in blocks.values())}.")
            entries.append({"name": flat.get("name", block.name), "type": flat.get("type"),
                            **nested_block_state(flat)})
        return {**kfac_state, "blocks": entries}

    @staticmethod
    def _check_momentum_buffers(state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint whose momentum buffers are not finite: the next step would write them into the weights
        (a kept step adds ``lr * v``), where the gradient check (``nonfinite_skips``) never looks."""
        for index, entry in state_dict.get("state", {}).items():
            buf = entry.get(MOMENTUM_BUFFER) if isinstance(entry, dict) else None
            if isinstance(buf, Tensor) and not bool(torch.isfinite(buf).all()):
                raise ValueError(f"KFAC checkpoint: the momentum buffer of parameter {index} (state[{index!r}]"
                                 f"[{MOMENTUM_BUFFER!r}]) is not finite; loading it would write NaN/inf into the "
                                 "weights at the next step. Resume from an earlier checkpoint, or drop that entry "
                                 "to restart its momentum from zero.")
