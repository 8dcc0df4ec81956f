"""KFAC: the K-FAC / SP-NGD preconditioner followed by momentum SGD, as a ``torch.optim.Optimizer``.

For every parameter, with ``d`` the preconditioned gradient (the plain gradient for layers K-FAC
does not support), ``lr_t`` the learning rate and ``m`` the momentum:

.. math::

    d &\\leftarrow d + \\mathrm{wd}\\, w \\quad (\\text{unless folded into the damping}) \\\\
    v &\\leftarrow m\\, v + d, \\qquad w \\leftarrow w - \\mathrm{lr}_t\\, v

This is PyTorch's SGD form, which equals Goyal et al.'s ``v <- m (lr_t / lr_{t-1}) v + lr_t d``
update *with* momentum correction. ``momentum_correction=False`` gives the uncorrected
``v <- m v + lr_t d`` instead. ``weight_rescaling`` (Osawa et al. 2019) clips the norm of every
Linear/Conv weight to ``sqrt(2 * d_out)`` after the update. Steps whose gradients are not finite
leave weights and momentum unchanged and are counted in ``skipped_steps`` (no host sync).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_lbo.optim.kfac.preconditioner import KFACPreconditioner


class KFAC(Optimizer):
    """K-FAC natural-gradient descent with momentum.

    Args:
        params: a module (hooks are registered now: ``KFAC(self, ...)`` in ``configure_optimizers``)
            or parameters / parameter groups (bind later: ``KFACCallback`` or the ``ddp_kfac``
            strategy calls :meth:`bind` with the LightningModule at setup).
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the (preconditioned) gradient.
        fold_weight_decay: add the L2 term *before* preconditioning and use ``max(damping, wd)`` as
            damping for preconditioned layers (Osawa et al.), instead of after.
        momentum_correction: see the module docstring.
        weight_rescaling: clip Linear/Conv weight norms to ``sqrt(2 * d_out)`` after each step.
        **preconditioner_kwargs: :class:`KFACPreconditioner` arguments (``damping``,
            ``factor_decay``, ``factor_update_interval``, ``inverse_update_interval``, ``fisher``,
            ``kl_clip``, ``stale_statistics``, ``exclude``, ...).

    Example::

        class Net(LightningModule):
            def configure_optimizers(self):
                return KFAC(self, lr=0.1, momentum=0.9, damping=1e-3, fisher="mc")
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, fold_weight_decay: bool = False, momentum_correction: bool = True,
                 weight_rescaling: bool = False, **preconditioner_kwargs: Any) -> None:
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}; use lr >= 0.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}; use a value in [0, 1).")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}; use a non-negative value.")
        module = params if isinstance(params, nn.Module) else None
        param_source = module.parameters() if module is not None else params
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, momentum_correction=momentum_correction,
                        weight_rescaling=weight_rescaling)
        super().__init__(param_source, defaults)
        self.fold_weight_decay = fold_weight_decay
        if fold_weight_decay:
            preconditioner_kwargs["l2"] = weight_decay
        all_params = [p for g in self.param_groups for p in g["params"]]
        self.preconditioner = KFACPreconditioner(None, params=all_params, **preconditioner_kwargs)
        self.skipped_steps = torch.zeros((), dtype=torch.long)
        if module is not None:
            self.bind(module)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum_correction", True)
            group.setdefault("weight_rescaling", False)

    def bind(self, module: nn.Module) -> None:
        """Register K-FAC's hooks on ``module``'s supported layers among this optimizer's parameters."""
        self.preconditioner.bind(module)
        self._preconditioned = {id(p) for st in self.preconditioner.states for p in st.block.params}
        self._rescaled = {id(st.block.weight): st.block.weight.shape[0] for st in self.preconditioner.states
                          if st.block.kind == "kronecker"}
        self.skipped_steps = self.skipped_steps.to(self.preconditioner.states[0].block.weight.device)
        pending = getattr(self, "_pending_kfac_state", None)
        if pending is not None:
            self.preconditioner.load_state_dict(pending)
            self._pending_kfac_state = None

    @property
    def bound(self) -> bool:
        return self.preconditioner.bound

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.preconditioner.bound:
            raise RuntimeError("KFAC was built from parameters and is not bound to its module: add "
                               "lightning_lbo.callbacks.KFACCallback() to the Trainer, use strategy='ddp_kfac', "
                               "or call optimizer.bind(model).")
        self.preconditioner.step(lr=self.param_groups[0]["lr"])
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        grads = [p.grad for p in params]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        self.skipped_steps += (~finite).long()
        for group in self.param_groups:
            self._update_group(group, finite)
        return loss

    def _update_group(self, group: dict[str, Any], finite: torch.Tensor) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        zero = torch.zeros((), device=params[0].device)
        grads = [torch.where(finite, p.grad, zero) for p in params]
        if wd:
            decayed = [(g, p) for g, p in zip(grads, params, strict=True)
                       if not (self.fold_weight_decay and id(p) in self._preconditioned)]
            if decayed:
                torch._foreach_add_([g for g, _ in decayed], [p for _, p in decayed], alpha=wd)
        lr_t = torch.where(finite, torch.tensor(float(lr), device=zero.device), zero)
        if momentum:
            bufs = []
            prev_lr = group.get("prev_lr", lr)
            scale = 1.0 if group["momentum_correction"] or not lr else prev_lr / lr
            m_t = torch.where(finite, torch.tensor(momentum * scale, device=zero.device), torch.ones_like(zero))
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.where(finite, g, zero).clone()
                    bufs.append(None)
                else:
                    bufs.append(state["momentum_buffer"])
            existing = [(b, g) for b, g in zip(bufs, grads, strict=True) if b is not None]
            if existing:
                torch._foreach_mul_([b for b, _ in existing], m_t)
                torch._foreach_add_([b for b, _ in existing], [g for _, g in existing])
            updates = [self.state[p]["momentum_buffer"] for p in params]
            group["prev_lr"] = lr
        else:
            updates = grads
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr_t))
        if group["weight_rescaling"]:
            self._rescale([p for p in params if id(p) in self._rescaled])

    def _rescale(self, weights: list[torch.Tensor]) -> None:
        if not weights:
            return
        norms = torch._foreach_norm(weights)
        factors = [torch.clamp((2.0 * self._rescaled[id(w)]) ** 0.5 / n.clamp_min(1e-12), max=1.0)
                   for w, n in zip(weights, norms, strict=True)]
        torch._foreach_mul_(weights, factors)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict() if self.preconditioner.bound else None
        state["skipped_steps"] = self.skipped_steps.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        kfac_state = state_dict.pop("kfac", None)
        skipped = state_dict.pop("skipped_steps", None)
        super().load_state_dict(state_dict)
        if skipped is not None:
            self.skipped_steps = skipped.to(self.skipped_steps.device).clone()
        if kfac_state is not None:
            if self.preconditioner.bound:
                self.preconditioner.load_state_dict(kfac_state)
            else:
                self._pending_kfac_state = kfac_state  # applied by bind()
