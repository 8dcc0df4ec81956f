r"""RMSprop warm-up (Akiba, Suzuki, Fukuda 2017, arXiv 1711.04325): start as RMSprop, end as momentum SGD.

With gradient :math:`g` (plus ``weight_decay * w``), fractional epoch :math:`e`:

.. math::

    m_t = \mu_2 m_{t-1} + (1 - \mu_2) g_t^2, \qquad
    D_t = \mu_1 D_{t-1} - \Big(\alpha_{sgd} + \frac{\alpha_{rms}}{\sqrt{m_t} + \epsilon}\Big) g_t, \qquad
    w_t = w_{t-1} + \eta D_t, \qquad \alpha_{rms} = (1 - \alpha_{sgd}) \frac{\eta_{rms}}{\eta}

and, with :math:`c` = ``beta_center`` (10) and :math:`p` = ``beta_period`` (5):

.. math::

    \alpha_{sgd}(e) = \begin{cases} \tfrac12 \exp(2 (e - c) / p) & e < c \\
                                    \tfrac12 + (e - c) / p & c \le e < c + p/2 \\
                                    1 & \text{otherwise} \end{cases}

The paper prints the middle branch with slope :math:`2/p`, which reaches 1.5 at the last join, makes
:math:`\alpha_{rms}` negative and jumps back to 1; the form above is continuous (and has a continuous
slope, :math:`1/p`) at both joins, so we use it. At :math:`e = 0` the update is RMSprop with LR
:math:`(1 - \alpha_{sgd})\eta_{rms}` plus momentum SGD with LR :math:`\alpha_{sgd}\eta`
(:math:`\alpha_{sgd}(0) = 0.5 e^{-4} \approx 0.009`); from :math:`e = c + p/2` on it is exactly momentum SGD
(``torch.optim.SGD`` with ``lr``, ``momentum``, ``weight_decay``) and the RMS statistics are no longer updated.

The fractional epoch comes from :class:`lightning_lbo.callbacks.fractional_epoch.FractionalEpoch`
(reads it off the Trainer each step, right under gradient accumulation and resume), from
:meth:`RMSpropWarmup.set_fractional_epoch`, or from ``steps_per_epoch`` (``e = steps taken / steps_per_epoch``).
If ``lr`` is 0 (e.g. a warmup schedule's first step) :math:`\alpha_{rms}` is undefined; the step then
leaves out the RMS term (the weights do not move either way).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_lbo.optim._step_utils import (
    NONFINITE_SKIPS,
    CheckedOptimizer,
    all_finite,
    check_count,
    check_momentum,
    check_non_negative,
    group_by_device_and_dtype,
    local_tensor,
    params_with_grads,
    use_foreach,
    zero_nonfinite_,
)

__all__ = ["RMSpropWarmup", "sgd_mixing"]


def sgd_mixing(epoch: float, beta_center: float = 10.0, beta_period: float = 5.0) -> float:
    """Akiba's :math:`\\alpha_{sgd}(e)` with the continuous middle branch (see the module docstring).

    >>> round(sgd_mixing(0.0), 5), sgd_mixing(10.0), sgd_mixing(11.25), sgd_mixing(12.5)
    (0.00916, 0.5, 0.75, 1.0)
    """
    if epoch < beta_center:
        return 0.5 * math.exp(2.0 * (epoch - beta_center) / beta_period)
    if epoch < beta_center + beta_period / 2:
        return 0.5 + (epoch - beta_center) / beta_period
    return 1.0


class RMSpropWarmup(CheckedOptimizer):
    """Akiba et al.'s hybrid RMSprop -> momentum SGD optimizer.

    Args:
        params: parameters or param groups.
        lr: SGD learning rate :math:`\\eta` (schedule it as usual, e.g. Akiba's slow-start).
        lr_rmsprop: RMSprop learning rate :math:`\\eta_{rms}` (paper: 3e-4), independent of ``lr``.
        momentum: :math:`\\mu_1` (paper: 0.9).
        alpha: decay :math:`\\mu_2` of the squared-gradient average (paper: 0.99).
        eps: :math:`\\epsilon` (paper: 1e-8), must be > 0.
        weight_decay: L2 term added to the gradient.
        beta_center: epoch where :math:`\\alpha_{sgd} = 1/2` (paper: 10).
        beta_period: transition width (paper: 5); pure SGD from ``beta_center + beta_period / 2``.
        steps_per_epoch: optimizer steps per epoch, to derive the fractional epoch when no
            :class:`~lightning_lbo.callbacks.fractional_epoch.FractionalEpoch` callback sets it.
        foreach: multi-tensor path; ``None`` picks it for plain tensors.

    Non-finite gradients: the whole step is skipped and counted in :attr:`nonfinite_skips` (see
    :mod:`lightning_lbo.optim._step_utils`); ``steps_taken``, a host-side count, still advances.

    Example::

        from lightning_lbo import RMSpropWarmup
        from lightning_lbo.callbacks.fractional_epoch import FractionalEpoch
        opt = RMSpropWarmup(model.parameters(), lr=12.8, lr_rmsprop=3e-4)
        trainer = Trainer(callbacks=[FractionalEpoch()])   # or RMSpropWarmup(..., steps_per_epoch=1251)
    """

    _GROUP_COPIES = (NONFINITE_SKIPS, "steps_taken", "fractional_epoch")
    _REFUSES_FSDP1 = True

    def __init__(self, params: Iterable[Any], lr: float = 0.1, lr_rmsprop: float = 3e-4, momentum: float = 0.9,
                 alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0, beta_center: float = 10.0,
                 beta_period: float = 5.0, steps_per_epoch: int | None = None, foreach: bool | None = None) -> None:
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r}; use a positive int (optimizer steps "
                             "per epoch) or None with the FractionalEpoch callback.")
        defaults = dict(lr=lr, lr_rmsprop=lr_rmsprop, momentum=momentum, alpha=alpha, eps=eps,
                        weight_decay=weight_decay, beta_center=beta_center, beta_period=beta_period, foreach=foreach)
        self._check_group(defaults)
        self.steps_per_epoch = steps_per_epoch
        super().__init__(params, defaults)
        self.steps_taken = 0  # optimizer steps so far (saved in state_dict)
        self.fractional_epoch: float | None = None  # set by FractionalEpoch / set_fractional_epoch

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_non_negative("lr", group["lr"])
        check_non_negative("lr_rmsprop", group["lr_rmsprop"])
        check_momentum(group["momentum"])
        check_momentum(group["alpha"], "alpha")
        check_non_negative("weight_decay", group["weight_decay"])
        eps = group["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
            raise ValueError(f"Invalid eps: {eps!r}; use a value > 0 (paper: 1e-8): a zero gradient would give 0/0.")
        if not (isinstance(group["beta_period"], (int, float)) and 0 < group["beta_period"] < float("inf")):
            raise ValueError(f"Invalid beta_period: {group['beta_period']!r}; use a value > 0 (paper: 5 epochs).")
        if not (isinstance(group["beta_center"], (int, float)) and math.isfinite(group["beta_center"])):
            raise ValueError(f"Invalid beta_center: {group['beta_center']!r}; use a finite epoch (paper: 10).")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    def set_fractional_epoch(self, epoch: float) -> None:
        """Tell the optimizer the fractional epoch of the next step (what ``FractionalEpoch`` calls)."""
        if not (isinstance(epoch, (int, float)) and math.isfinite(epoch) and epoch >= 0):
            raise ValueError(f"Invalid fractional epoch: {epoch!r}; use a finite value >= 0.")
        self.fractional_epoch = float(epoch)

    def current_epoch(self) -> float:
        """The fractional epoch the next step uses."""
        if self.fractional_epoch is not None:
            return self.fractional_epoch
        if self.steps_per_epoch is not None:
            return self.steps_taken / self.steps_per_epoch
        raise RuntimeError("RMSpropWarmup does not know the fractional epoch: pass steps_per_epoch=... or add the "
                           "lightning_lbo.callbacks.fractional_epoch.FractionalEpoch callback to the Trainer.")

    def sgd_mixing(self, group: dict[str, Any] | None = None) -> float:
        """:math:`\\alpha_{sgd}` of the next step for ``group`` (default: the first group)."""
        group = group or self.param_groups[0]
        return sgd_mixing(self.current_epoch(), group["beta_center"], group["beta_period"])

    def _group_copies(self) -> dict[str, Any]:
        return {**super()._group_copies(), "steps_taken": self.steps_taken, "fractional_epoch": self.fractional_epoch}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rmsprop_warmup"] = {"steps_taken": self.steps_taken, "fractional_epoch": self.fractional_epoch}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("rmsprop_warmup", None)
        if extra is not None:  # the top-level entry of a torch.save checkpoint; else the param groups' copies
            state_dict.update(steps_taken=extra.get("steps_taken", 0), fractional_epoch=extra.get("fractional_epoch"))
        super().load_state_dict(state_dict)

    def _check_loaded(self, state_dict: dict[str, Any], extras: dict[str, Any]) -> None:
        fix = "; the checkpoint is corrupt: resume from an earlier one."
        if extras.get("steps_taken") is not None:
            check_count("RMSpropWarmup checkpoint: steps_taken", extras["steps_taken"], fix)
        epoch = extras.get("fractional_epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, float))
                                  or not math.isfinite(epoch) or epoch < 0):
            raise ValueError(f"RMSpropWarmup checkpoint: fractional_epoch is {epoch!r}, must be a finite value "
                             f">= 0{fix}")
        super()._check_loaded(state_dict, extras)

    def _load_extras(self, extras: dict[str, Any]) -> None:
        super()._load_extras(extras)
        self.steps_taken = int(extras.get("steps_taken") or 0)
        self.fractional_epoch = extras.get("fractional_epoch")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One hybrid step; ``closure`` runs once under ``torch.enable_grad()``."""
        loss = self._evaluate_closure(closure)
        epoch = self.current_epoch()
        work = [(group, *params_with_grads(group, "RMSpropWarmup")) for group in self.param_groups]
        work = [(group, params, grads) for group, params, grads in work if params]
        keep = self._step_keep([g for _, _, grads in work for g in grads]) if work else None
        for group, params, grads in work:
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            a_sgd = sgd_mixing(epoch, group["beta_center"], group["beta_period"])
            lr = group["lr"]
            a_rms = (1.0 - a_sgd) * group["lr_rmsprop"] / lr if lr != 0 else 0.0
            states = [self.state[p] for p in params]
            local_params = [local_tensor(p) for p in params]
            velocities = [local_tensor(s["velocity"]) for s in states]
            rmsprop_warmup(local_params, [local_tensor(g) for g in grads], velocities,
                           [local_tensor(s["square_avg"]) for s in states],
                           keep=keep, lr=lr, a_sgd=a_sgd, a_rms=a_rms, momentum=group["momentum"],
                           alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                           foreach=use_foreach(group["foreach"], local_params))
        self.steps_taken += 1
        self.fractional_epoch = None  # consumed: the callback sets it again before the next step
        return loss


def rmsprop_warmup(params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], square_avgs: list[Tensor],
                   *, keep: Tensor | None = None, lr: float | Tensor, a_sgd: float, a_rms: float, momentum: float,
                   alpha: float, eps: float, weight_decay: float, foreach: bool) -> None:
    """Functional hybrid update in place (formulas in the module docstring); ``a_rms = 0`` skips the RMS work.

    ``keep`` (0-d bool) is the step's decision; ``None``: taken iff these gradients are all finite.
    """
    if keep is None:
        keep = all_finite(grads)
    fn = _multi_tensor_rmsprop_warmup if foreach else _single_tensor_rmsprop_warmup
    fn(params, grads, velocities, square_avgs, keep, lr=lr, a_sgd=a_sgd, a_rms=a_rms, momentum=momentum,
       alpha=alpha, eps=eps, weight_decay=weight_decay)


def _coefficients(keep: Tensor, *, lr: float | Tensor, momentum: float, alpha: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(keep as 0/1, velocity decay, square-average decay, lr)``: 0, 1, 1, 0 on a skipped step."""
    one = torch.ones(keep.shape, device=keep.device)
    return (keep.to(one.dtype), torch.where(keep, momentum * one, one), torch.where(keep, alpha * one, one),
            torch.where(keep, lr * one, torch.zeros_like(one)))


def _single_tensor_rmsprop_warmup(params: list[Tensor], grads: list[Tensor], velocities: list[Tensor],
                                  square_avgs: list[Tensor], keep: Tensor, *, lr: float | Tensor,
                                  a_sgd: float, a_rms: float, momentum: float, alpha: float, eps: float,
                                  weight_decay: float) -> None:
    for w, g, vel, sq in zip(params, grads, velocities, square_avgs, strict=True):
        zero_nonfinite_(g)
        kept, vel_decay, sq_decay, step_lr = (c.to(w.dtype) for c in _coefficients(keep.to(w.device), lr=lr,
                                                                                   momentum=momentum, alpha=alpha))
        vel.mul_(vel_decay)
        if a_rms != 0:
            d = g * kept  # zero on a skipped step, so neither average moves
            if weight_decay != 0:
                d.addcmul_(w, kept * weight_decay)
            sq.mul_(sq_decay).addcmul_(d, d, value=1 - alpha)
            vel.add_(d, alpha=-a_sgd).addcdiv_(d, sq.sqrt().add_(eps), value=-a_rms)
        else:  # pure momentum SGD: d = g + wd * w is not materialised
            vel.addcmul_(g, kept * -a_sgd)
            if weight_decay != 0:
                vel.addcmul_(w, kept * (-a_sgd * weight_decay))
        w.addcmul_(vel, step_lr)


def _multi_tensor_rmsprop_warmup(params: list[Tensor], grads: list[Tensor], velocities: list[Tensor],
                                 square_avgs: list[Tensor], keep: Tensor, *, lr: float | Tensor,
                                 a_sgd: float, a_rms: float, momentum: float, alpha: float, eps: float,
                                 weight_decay: float) -> None:
    for ws, gs, vs, sqs in group_by_device_and_dtype([params, grads, velocities, square_avgs]):
        zero_nonfinite_(gs)
        kept, vel_decay, sq_decay, step_lr = (c.to(ws[0].dtype) for c in _coefficients(keep.to(ws[0].device), lr=lr,
                                                                                        momentum=momentum, alpha=alpha))
        torch._foreach_mul_(vs, vel_decay)
        if a_rms != 0:
            ds = torch._foreach_mul(gs, kept)  # zero on a skipped step: no average moves
            if weight_decay != 0:
                torch._foreach_addcmul_(ds, ws, [kept * weight_decay] * len(ws))
            torch._foreach_mul_(sqs, sq_decay)
            torch._foreach_addcmul_(sqs, ds, ds, value=1 - alpha)
            torch._foreach_add_(vs, ds, alpha=-a_sgd)
            denom = torch._foreach_sqrt(sqs)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(vs, ds, denom, value=-a_rms)
        else:  # pure momentum SGD: d = g + wd * w is not materialised
            torch._foreach_addcmul_(vs, gs, [kept * -a_sgd] * len(gs))
            if weight_decay != 0:
                torch._foreach_addcmul_(vs, ws, [kept * (-a_sgd * weight_decay)] * len(ws))
        torch._foreach_addcmul_(ws, vs, [step_lr] * len(ws))
