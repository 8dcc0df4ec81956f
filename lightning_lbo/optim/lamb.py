r"""LAMB: layer-wise adaptive moments for large-batch training (You et al. 2019, arXiv 1904.00962, Algorithm 2).

Per parameter tensor with weight :math:`w`, gradient :math:`g`, step :math:`t`:

.. math::

    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2, \\
    \hat m = m_t / (1 - \beta_1^t), \qquad \hat v = v_t / (1 - \beta_2^t), \qquad
    u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w, \\
    w \leftarrow w - \eta_t \, \frac{\phi(\lVert w \rVert)}{\lVert u \rVert} \, u

with :math:`\phi` the identity. Options: ``bias_correction=False`` drops the hat corrections (the
paper's Algorithm 2 omits them; its experiments and most implementations keep them);
``max_trust_ratio`` clips the ratio :math:`\lVert w \rVert / \lVert u \rVert` from above (NVIDIA / timm
"trust clip"). A zero ``||w||`` or ``||u||`` gives ratio 1. Group switches as LARS: ``weight_decay`` and
``lars_adapt`` (``False``: ratio 1, i.e. AdamW-style decoupled decay with no layer adaptation).

Speed: the moments and the Adam direction come from torch's fused Adam kernel (``torch._fused_adam_``,
the kernel behind ``torch.optim.Adam(fused=True)``) run on a buffer that already holds
:math:`\lambda w`, with learning rate -1: it leaves :math:`u` in the buffer in one pass over
:math:`g, m, v, u`. Its ``found_inf`` argument skips a non-finite step on the device, so no gradient is
cleaned. What remains is LAMB's own work: :math:`\lVert w \rVert`, :math:`\lVert u \rVert` and one scaled
add. ``fused=False`` (or a device/dtype the kernel lacks) uses the ``torch._foreach_*`` path.

Skipped steps (see :mod:`lightning_lbo.optim._step_utils`): a non-finite gradient anywhere skips the
whole step; the per-tensor ``step`` (bias correction) counts only the steps taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_lbo.optim._step_utils import (
    CheckedOptimizer,
    ShardLayout,
    all_finite,
    check_momentum,
    check_non_negative,
    group_by_device_and_dtype,
    local_tensor,
    params_with_grads,
    shard_layout,
    use_foreach,
    whole_norms,
    zero_nonfinite_,
)

__all__ = ["LAMB", "lamb"]

_FUSED_DEVICES = ("cpu", "cuda")


class LAMB(CheckedOptimizer):
    """Adam moments with a per-tensor trust ratio (LAMB).

    Args:
        params: parameters or param groups (groups may set ``weight_decay`` and ``lars_adapt``).
        lr: learning rate :math:`\\eta`.
        betas: :math:`(\\beta_1, \\beta_2)`, each in [0, 1).
        eps: added to :math:`\\sqrt{\\hat v}`.
        weight_decay: :math:`\\lambda`, added to the Adam direction (inside the trust ratio).
        bias_correction: divide the moments by :math:`1 - \\beta^t`.
        max_trust_ratio: upper bound of the trust ratio (``None``: unbounded, as in the paper).
        lars_adapt: default of the per-group switch; ``False`` disables the trust ratio.
        foreach: multi-tensor path; ``None`` picks it for plain tensors; ``False``: a per-tensor loop.
        fused: moments by torch's fused Adam kernel (see the module docstring); ``None`` picks it where
            the kernel exists (CPU, CUDA; floating dtypes, bias correction on) unless ``foreach=False``.

    Non-finite gradients: the whole step is skipped (see :mod:`lightning_lbo.optim._step_utils`) and
    counted in :attr:`nonfinite_skips`.

    Example::

        from lightning_lbo import LAMB
        opt = LAMB(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    """

    _STATE_COUNTS = ("step",)
    _REFUSES_FSDP1 = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 max_trust_ratio: float | None = None, lars_adapt: bool = True, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust_ratio=max_trust_ratio, lars_adapt=lars_adapt,
                        foreach=foreach, fused=fused)
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_non_negative("lr", group["lr"])
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; use two values in [0, 1), e.g. (0.9, 0.999).")
        check_momentum(betas[0], "betas[0]")
        check_momentum(betas[1], "betas[1]")
        eps = group["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
            raise ValueError(f"Invalid eps: {eps!r}; use a value > 0 (e.g. 1e-6): a weight whose gradient is 0 "
                             "(a dead ReLU unit) would get 0/(sqrt(0)+0) = NaN.")
        check_non_negative("weight_decay", group["weight_decay"])
        mtr = group["max_trust_ratio"]
        if mtr is not None and (isinstance(mtr, bool) or not isinstance(mtr, (int, float)) or not mtr > 0):
            raise ValueError(f"Invalid max_trust_ratio: {mtr!r}; use a value > 0 (e.g. 10.0) or None for no clipping.")
        if group.get("fused") and group.get("foreach") is False:
            raise ValueError("fused=True needs the multi-tensor path; drop foreach=False (or set fused=False).")
        if group.get("fused") and not group["bias_correction"]:
            raise ValueError("fused=True always applies bias correction; use fused=None/False with "
                             "bias_correction=False.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("max_trust_ratio", None)
            group.setdefault("lars_adapt", True)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB step; ``closure`` runs once under ``torch.enable_grad()``."""
        loss = self._evaluate_closure(closure)
        work = [(group, *params_with_grads(group, "LAMB")) for group in self.param_groups]
        work = [(group, params, grads) for group, params, grads in work if params]
        if not work:
            return loss
        keep = self._step_keep([g for _, _, grads in work for g in grads])
        for group, params, grads in work:
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            local_params = [local_tensor(p) for p in params]
            layouts = [shard_layout(p) for p in params]
            lamb(local_params, [local_tensor(g) for g in grads], [local_tensor(s["exp_avg"]) for s in states],
                 [local_tensor(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], keep=keep,
                 lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                 weight_decay=group["weight_decay"],
                 bias_correction=group["bias_correction"], max_trust_ratio=group["max_trust_ratio"],
                 adapt=group["lars_adapt"], foreach=use_foreach(group["foreach"], local_params),
                 fused=_use_fused(group, local_params), layouts=layouts if any(layouts) else None)
        return loss


def _use_fused(group: dict[str, Any], params: list[Tensor]) -> bool:
    """``fused=None``: the fused kernel where it exists and the group allows it."""
    fused = group["fused"]
    if fused is not None:
        return fused
    return (group["foreach"] is not False and group["bias_correction"] and hasattr(torch, "_fused_adam_")
            and all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type in _FUSED_DEVICES
                    and p.dtype.is_floating_point for p in params))


def lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
         steps: list[Tensor], *, keep: Tensor | None = None, lr: float | Tensor, beta1: float, beta2: float,
         eps: float, weight_decay: float, bias_correction: bool, max_trust_ratio: float | None, adapt: bool,
         foreach: bool, fused: bool = False, layouts: list[ShardLayout | None] | None = None) -> None:
    """Functional LAMB update in place; ``steps`` are 0-d float tensors, advanced only when the step is taken.

    ``keep`` (0-d bool) is the step's decision (see ``CheckedOptimizer._step_keep``); ``None``: taken iff
    these gradients are all finite. ``layouts`` (one per tensor, from ``shard_layout``): the tensors are
    local shards of sharded parameters, whose trust-ratio norms are all-reduced into whole-tensor norms.
    """
    if keep is None:
        keep = all_finite(grads)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio,
              adapt=adapt, layouts=layouts if layouts is not None else [None] * len(params))
    if fused:
        if not bias_correction:
            raise ValueError("fused=True always applies bias correction; use fused=False with bias_correction=False.")
        _fused_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, keep, **kw)
        return
    fn = _multi_tensor_lamb if foreach else _single_tensor_lamb
    fn(params, grads, exp_avgs, exp_avg_sqs, steps, keep, bias_correction=bias_correction, **kw)


def _moment_coefficients(keep: Tensor, step: Tensor, *, beta1: float, beta2: float, bias_correction: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-tensor ``(m decay, v decay, 1 / bias_correction1, 1 / sqrt(bias_correction2))``; skipped: decay 1."""
    one = torch.ones_like(step)
    b1 = torch.where(keep, torch.full_like(step, beta1), one)
    b2 = torch.where(keep, torch.full_like(step, beta2), one)
    if not bias_correction:
        return b1, b2, one, one
    t = torch.clamp(step, min=1.0)  # a tensor whose every step was skipped has step 0: keep the division finite
    return b1, b2, 1.0 / (1.0 - beta1 ** t), torch.rsqrt(1.0 - beta2 ** t)


def _whole_norm_pair(w_norms: list[Tensor], u_norms: list[Tensor], layouts: list[ShardLayout | None]
                     ) -> tuple[Tensor, Tensor]:
    """``||w||`` and ``||u||`` of whole tensors, stacked; for shards both are all-reduced together (one collective)."""
    norms = whole_norms(list(w_norms) + list(u_norms), list(layouts) * 2)
    return torch.stack(norms[:len(w_norms)]), torch.stack(norms[len(w_norms):])


def _update_scale(keep: Tensor, w_norm: Tensor, u_norm: Tensor, *, lr: float | Tensor,
                  max_trust_ratio: float | None, adapt: bool) -> Tensor:
    """``-lr * trust_ratio`` per tensor, 0 where the step is skipped."""
    if adapt:
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if max_trust_ratio is not None:
            ratio = torch.clamp(ratio, max=max_trust_ratio)
    else:
        ratio = torch.ones_like(w_norm)
    return torch.where(keep, -lr * ratio, torch.zeros_like(ratio))


def _fused_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], keep: Tensor, *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                weight_decay: float, max_trust_ratio: float | None, adapt: bool,
                layouts: list[ShardLayout | None]) -> None:
    for ws, gs, ms, vs, ts, ls in group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps, layouts]):
        kept = keep.to(ts[0].device)
        w_norms = torch._foreach_norm(ws)
        # u starts as wd * w; the kernel with lr = -1 adds m_hat / (sqrt(v_hat) + eps) to it and updates m, v.
        us = torch._foreach_mul(ws, weight_decay) if weight_decay != 0 else [torch.zeros_like(w) for w in ws]
        torch._foreach_add_(ts, kept.to(ts[0].dtype), alpha=1.0)  # alpha: the Tensor overload, no .item()
        torch._fused_adam_(us, gs, ms, vs, [], ts, lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                           amsgrad=False, maximize=False, grad_scale=None, found_inf=(~kept).to(torch.float32))
        w_norm, u_norm = _whole_norm_pair(w_norms, torch._foreach_norm(us), ls)
        scale = _update_scale(kept, w_norm, u_norm, lr=lr, max_trust_ratio=max_trust_ratio, adapt=adapt)
        torch._foreach_addcmul_(ws, us, list(scale.to(ws[0].dtype).unbind()))


def _single_tensor_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[Tensor], keep: Tensor, *, lr: float | Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
                        max_trust_ratio: float | None, adapt: bool, layouts: list[ShardLayout | None]) -> None:
    for w, g, m, v, step, layout in zip(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, strict=True):
        kept = keep.to(w.device)
        w_norm = torch.linalg.vector_norm(w)
        step.add_(kept.to(step.dtype))
        zero_nonfinite_(g)
        g = g * kept  # a skipped step's moments must not move (the caller's gradient stays as it was)
        b1, b2, inv_bc1, inv_sqrt_bc2 = _moment_coefficients(kept, step.to(w.dtype), beta1=beta1, beta2=beta2,
                                                             bias_correction=bias_correction)
        m.mul_(b1).add_(g, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)
        u = torch.div(m, v.sqrt().mul_(inv_sqrt_bc2).add_(eps)).mul_(inv_bc1)
        if weight_decay != 0:
            u.add_(w, alpha=weight_decay)
        w_norm, u_norm = _whole_norm_pair([w_norm], [torch.linalg.vector_norm(u)], [layout])
        scale = _update_scale(kept, w_norm[0], u_norm[0], lr=lr, max_trust_ratio=max_trust_ratio, adapt=adapt)
        w.addcmul_(u, scale)


def _multi_tensor_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], steps: list[Tensor], keep: Tensor, *, lr: float | Tensor,
                       beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
                       max_trust_ratio: float | None, adapt: bool, layouts: list[ShardLayout | None]) -> None:
    for ws, gs, ms, vs, ts, ls in group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps, layouts]):
        kept = keep.to(ws[0].device)
        w_norms = torch._foreach_norm(ws)
        torch._foreach_add_(ts, kept.to(ts[0].dtype), alpha=1.0)  # alpha: the Tensor overload, no .item()
        zero_nonfinite_(gs)
        gs = torch._foreach_mul(gs, kept.to(gs[0].dtype))  # a skipped step's moments must not move
        b1, b2, inv_bc1, inv_sqrt_bc2 = _moment_coefficients(kept, torch.stack(ts).to(ws[0].dtype), beta1=beta1,
                                                             beta2=beta2, bias_correction=bias_correction)
        torch._foreach_mul_(ms, list(b1.unbind()))
        torch._foreach_add_(ms, gs, alpha=1 - beta1)
        torch._foreach_mul_(vs, list(b2.unbind()))
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        us = torch._foreach_sqrt(vs)
        torch._foreach_mul_(us, list(inv_sqrt_bc2.unbind()))
        torch._foreach_add_(us, eps)
        torch._foreach_reciprocal_(us)
        torch._foreach_mul_(us, ms)
        torch._foreach_mul_(us, list(inv_bc1.unbind()))
        if weight_decay != 0:
            torch._foreach_add_(us, ws, alpha=weight_decay)
        w_norm, u_norm = _whole_norm_pair(w_norms, torch._foreach_norm(us), ls)
        scale = _update_scale(kept, w_norm, u_norm, lr=lr, max_trust_ratio=max_trust_ratio, adapt=adapt)
        torch._foreach_addcmul_(ws, us, list(scale.unbind()))
