r"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, arXiv 1708.03888), LARC clip mode.

Algorithm 1 of the paper, per layer (parameter tensor) :math:`l` with weight :math:`w`, gradient :math:`g`,
trust coefficient :math:`\eta`, weight decay :math:`\beta`, momentum :math:`m`, global LR :math:`\gamma_t`:

.. math::

    \lambda_l = \eta \frac{\lVert w_l \rVert}{\lVert g_l \rVert + \beta \lVert w_l \rVert + \epsilon}, \qquad
    v_l \leftarrow m v_l + \gamma_t \lambda_l (g_l + \beta w_l), \qquad w_l \leftarrow w_l - v_l

``momentum_form="paper"`` is exactly this (LR inside the momentum buffer). ``momentum_form="pytorch"``
(the default, like ``torch.optim.SGD`` and most PyTorch LARS code) keeps the LR outside:
:math:`v \leftarrow m v + \lambda (g + \beta w)`, :math:`w \leftarrow w - \gamma_t v`. The two agree while the LR
is constant; when it changes the PyTorch form applies the new LR to the whole buffer (Goyal et al.'s
momentum correction), the paper form only to new gradients. Nesterov: ``w -= gamma (lambda d + m v)``
(PyTorch form) or ``w -= m v + gamma lambda d`` (paper form), with ``d = g + beta w``.

Differences from the paper: an ``eps`` in the denominator; the ratio is 1 when ``||w|| = 0`` or
``||g|| = 0`` (MLPerf reference); ``clip=True`` is NVIDIA's LARC: the effective LR is
``min(gamma * lambda / gamma, 1) * gamma = min(lambda, gamma)``.

Param-group switches (as produced by :mod:`lightning_lbo.param_groups`): ``weight_decay`` (float) and
``lars_adapt`` (bool; ``False`` gives ratio 1, i.e. plain momentum SGD, for biases and norm layers).

Storage: each tensor's momentum buffer is kept as ``state["momentum_scale"] * state["scaled_momentum_buffer"]``
(a 0-d scale times a tensor). The decay ``v <- m v`` then multiplies only the 0-d scale instead of
reading and writing the whole buffer; every ``log(1e-3) / log(m)`` steps (a count kept on the host in
``param_group["steps_since_rescale"]``) the scale is folded back into the buffer, so it never drops
below 1e-3. This saves one full pass over the buffers per step (LARS costs ~1.1x a foreach SGD step).

:class:`LAMB` (You et al. 2019) lives in :mod:`lightning_lbo.optim.lamb` and is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from lightning_lbo.optim._step_utils import (
    CheckedOptimizer,
    all_finite,
    check_momentum,
    check_non_negative,
    group_by_device_and_dtype,
    lars_trust_ratio,
    local_norms,
    local_tensor,
    params_with_grads,
    shard_layout,
    use_foreach,
    whole_norms,
    zero_nonfinite_,
)
from lightning_lbo.optim.lamb import LAMB  # one paper per file; importable from here as the public API says

__all__ = ["LARS", "LAMB", "MomentumForm", "lars"]

SCALED_BUFFER = "scaled_momentum_buffer"  # momentum buffer = state[BUFFER_SCALE] * state[SCALED_BUFFER]
BUFFER_SCALE = "momentum_scale"


class MomentumForm(str, Enum):
    """Where the learning rate enters the momentum update."""

    PYTORCH = "pytorch"  # v = m v + ratio d;        w -= lr v
    PAPER = "paper"  # v = m v + lr ratio d;     w -= v   (You et al. 2017, Algorithm 1)

    @classmethod
    def parse(cls, value: str | MomentumForm) -> MomentumForm:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"Invalid momentum_form: {value!r}. Supported: {tuple(m.value for m in cls)}.") from None


class LARS(CheckedOptimizer):
    """Momentum SGD with a per-tensor trust ratio (LARS), optionally LARC-clipped.

    Args:
        params: parameters or param groups (groups may set ``weight_decay`` and ``lars_adapt``).
        lr: global learning rate :math:`\\gamma`.
        momentum: momentum :math:`m` in [0, 1).
        weight_decay: :math:`\\beta`, added to the gradient and inside the trust ratio's denominator.
        trust_coefficient: :math:`\\eta` (paper: 0.001).
        eps: added to the ratio's denominator.
        nesterov: Nesterov momentum.
        momentum_form: ``"pytorch"`` (LR outside the buffer) or ``"paper"`` (LR inside).
        clip: LARC clip mode, effective LR ``min(local_lr, lr)``.
        lars_adapt: default of the per-group switch; ``False`` disables the trust ratio.
        foreach: multi-tensor (``torch._foreach_*``) path; ``None`` picks it for plain tensors.

    Non-finite gradients: the whole step is skipped (weights and momentum untouched) and counted in
    :attr:`nonfinite_skips` (see :mod:`lightning_lbo.optim._step_utils`). The gradient norms the trust
    ratio needs are the ones that decide, so the check costs no extra pass.

    Example::

        from lightning_lbo import LARS
        from lightning_lbo.param_groups import param_groups  # biases/BN: no decay, no adaptation
        opt = LARS(param_groups(model, weight_decay=5e-4), lr=2.0, momentum=0.9, weight_decay=5e-4,
                   trust_coefficient=1e-3)
    """

    _STATE_POSITIVE = (BUFFER_SCALE,)
    _REFUSES_FSDP1 = True

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 momentum_form: str | MomentumForm = MomentumForm.PYTORCH, clip: bool = False,
                 lars_adapt: bool = True, foreach: bool | None = None) -> None:
        form = MomentumForm.parse(momentum_form)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, momentum_form=form.value, clip=clip, lars_adapt=lars_adapt,
                        foreach=foreach)
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_non_negative("lr", group["lr"])
        check_momentum(group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_non_negative("eps", group["eps"])
        tc = group["trust_coefficient"]
        if isinstance(tc, bool) or not isinstance(tc, (int, float)) or not 0.0 < tc < float("inf"):
            raise ValueError(f"Invalid trust_coefficient: {tc!r}; use a value > 0 (paper: 0.001), or set "
                             "lars_adapt=False to turn the trust ratio off.")
        group["momentum_form"] = MomentumForm.parse(group["momentum_form"]).value  # store the plain string
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0; set momentum (e.g. 0.9) or nesterov=False.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("momentum_form", MomentumForm.PYTORCH.value)
            group.setdefault("clip", False)
            group.setdefault("lars_adapt", True)
            group.setdefault("foreach", None)

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The true momentum buffer of ``p`` (``momentum_scale * scaled_momentum_buffer``), or None before a step."""
        state = self.state.get(p, {})
        return state[BUFFER_SCALE] * state[SCALED_BUFFER] if SCALED_BUFFER in state else None

    @torch.no_grad()
    def scale_momentum_(self, factor: float, group: dict[str, Any] | None = None) -> None:
        """Multiply the momentum buffers of ``group`` (default: all groups) by ``factor``.

        This is Goyal et al.'s momentum correction ``lr_new / lr_old`` for the paper form (LR inside the
        buffer); it touches only the 0-d scales. With it, the paper form follows the PyTorch form.
        """
        for g in [group] if group is not None else self.param_groups:
            scales = [self.state[p][BUFFER_SCALE] for p in g["params"] if BUFFER_SCALE in self.state.get(p, {})]
            if scales:
                torch._foreach_mul_(scales, factor)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS step; ``closure`` (re-evaluates the loss) runs once under ``torch.enable_grad()``."""
        loss = self._evaluate_closure(closure)
        work = [(group, *params_with_grads(group, "LARS")) for group in self.param_groups]
        work = [(group, params, grads) for group, params, grads in work if params]
        if not work:
            return loss
        # ||g|| and ||w|| of every tensor of every group first, of whole tensors (a sharded parameter's norm
        # from its shards' norms, one all-reduce for all); the ||g|| decide whether the step is taken (all or none)
        all_grads = [g for _, _, grads in work for g in grads]
        all_params = [p for _, params, _ in work for p in params]
        tensors = all_grads + all_params
        norms = whole_norms(local_norms(tensors), [shard_layout(t) for t in tensors])
        grad_norms, weight_norms = norms[:len(all_grads)], norms[len(all_grads):]
        keep = self._step_keep(all_grads, grad_norms)
        start = 0
        for group, params, grads in work:
            stop = start + len(params)
            bufs = scales = None
            rescale = False
            if group["momentum"] != 0:
                bufs, scales = [], []
                for p in params:
                    state = self.state[p]
                    if SCALED_BUFFER not in state:
                        state[SCALED_BUFFER] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state[BUFFER_SCALE] = torch.ones((), dtype=_scale_dtype(p), device=p.device)
                    if state[BUFFER_SCALE].dtype != _scale_dtype(p):  # load_state_dict casts to the param dtype
                        state[BUFFER_SCALE] = state[BUFFER_SCALE].to(_scale_dtype(p))
                    bufs.append(state[SCALED_BUFFER])
                    scales.append(state[BUFFER_SCALE])
                # host-side count: the scales are >= momentum ** count, so folding them back into the buffers
                # every `_rescale_interval` steps keeps 1 / scale <= 1e3 with no device read
                count = group.get("steps_since_rescale", 0)
                rescale = count >= _rescale_interval(group["momentum"])
                group["steps_since_rescale"] = 1 if rescale else count + 1
            local_params = [local_tensor(p) for p in params]
            lars(local_params, [local_tensor(g) for g in grads], [local_tensor(b) for b in bufs] if bufs else bufs,
                 scales, keep=keep, grad_norms=grad_norms[start:stop], weight_norms=weight_norms[start:stop],
                 lr=group["lr"],
                 momentum=group["momentum"], weight_decay=group["weight_decay"],
                 trust_coefficient=group["trust_coefficient"], eps=group["eps"], nesterov=group["nesterov"],
                 paper_form=group["momentum_form"] == MomentumForm.PAPER.value, clip=group["clip"],
                 adapt=group["lars_adapt"], rescale=rescale, foreach=use_foreach(group["foreach"], local_params))
            start = stop
        return loss


def lars(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, scales: list[Tensor] | None, *,
         keep: Tensor | None = None, grad_norms: list[Tensor] | None = None,
         weight_norms: list[Tensor] | None = None, lr: float | Tensor, momentum: float,
         weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool, paper_form: bool, clip: bool,
         adapt: bool, rescale: bool, foreach: bool) -> None:
    """Functional LARS update of ``params`` in place (see the module docstring for the formulas).

    The momentum buffer of each tensor is stored as ``scale * scaled_buffer`` (``bufs``: the scaled
    buffers, zeros at the first step; ``scales``: 0-d tensors; both ``None`` when ``momentum == 0``).
    Decaying the buffer by ``m`` is then a multiply of the 0-d scale, not a pass over the tensor, which
    saves one read+write of every buffer per step. ``rescale`` first folds the scales back into the
    buffers (done every few steps, decided on the host). ``keep`` (0-d bool) is the step's decision
    (``None``: taken iff these gradients are finite); ``grad_norms`` and ``weight_norms`` are ``||g||`` and
    ``||w||`` per tensor if already known (of the whole tensors when ``params`` are local shards).
    """
    if grad_norms is None:
        grad_norms = torch._foreach_norm(grads)
    if weight_norms is None:
        weight_norms = torch._foreach_norm(params)
    if keep is None:
        keep = all_finite(grads, grad_norms)
    fn = _multi_tensor_lars if foreach else _single_tensor_lars
    fn(params, grads, bufs, scales, keep, grad_norms, weight_norms, lr=lr, momentum=momentum, weight_decay=weight_decay,
       trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, paper_form=paper_form, clip=clip,
       adapt=adapt, rescale=rescale)


def _scale_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _rescale_interval(momentum: float) -> int:
    """Steps after which ``momentum ** steps`` drops below 1e-3 (the scale's lower bound)."""
    return max(1, int(math.log(1e-3) / math.log(momentum))) if 0 < momentum < 1 else 1


def _coefficients(keep: Tensor, w_norm: Tensor, g_norm: Tensor, *, lr: float | Tensor, momentum: float,
                  weight_decay: float, trust_coefficient: float, eps: float, paper_form: bool, clip: bool, adapt: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor (elementwise over the norm tensors) coefficients, all finite and masked by ``keep``.

    Returns ``(d_coef, buf_decay, lr_out)``: ``buf = buf_decay * buf + d_coef * d`` and the step is
    ``w -= lr_out * (buf or d)``; a skipped step gets ``d_coef = 0``, ``buf_decay = 1``, ``lr_out = 0``.
    """
    if adapt:
        ratio = lars_trust_ratio(w_norm, g_norm, trust_coefficient=trust_coefficient, weight_decay=weight_decay,
                                 eps=eps, lr=lr, clip=clip)
    else:
        ratio = torch.ones_like(w_norm)
    zero = torch.zeros_like(ratio)
    d_coef = torch.where(keep, ratio * lr if paper_form else ratio, zero)
    buf_decay = torch.where(keep, torch.full_like(ratio, momentum), torch.ones_like(ratio))
    lr_out = torch.where(keep, torch.ones_like(ratio) if paper_form else torch.full_like(ratio, 1.0) * lr, zero)
    return d_coef, buf_decay, lr_out


def _single_tensor_lars(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                        scales: list[Tensor] | None, keep: Tensor, grad_norms: list[Tensor],
                        weight_norms: list[Tensor], *, lr: float | Tensor,
                        momentum: float, weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool,
                        paper_form: bool, clip: bool, adapt: bool, rescale: bool) -> None:
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        d_coef, buf_decay, lr_out = _coefficients(
            keep.to(w.device), weight_norms[i], grad_norms[i], lr=lr, momentum=momentum,
            weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, paper_form=paper_form,
            clip=clip, adapt=adapt)
        zero_nonfinite_(g)
        step = lr_out * d_coef  # weight of d = g + wd * w in the step (Nesterov / no momentum)
        if bufs is not None and scales is not None:
            buf, scale = bufs[i], scales[i]
            if rescale:
                buf.mul_(scale)
                scale.fill_(1.0)
            scale.mul_(buf_decay)  # true buffer m * v: decay the scale only
            into = d_coef / scale  # d_coef * d enters the true buffer
            buf.addcmul_(g, into.to(buf.dtype))
            if weight_decay != 0:
                buf.addcmul_(w, (into * weight_decay).to(buf.dtype))
            if not nesterov:
                w.addcmul_(buf, (-lr_out * scale).to(w.dtype))
                continue
        # d = g + wd * w is never materialised: w's own term is a rescale of w
        if weight_decay != 0:
            w.mul_(1 - step * weight_decay)
        w.addcmul_(g, -step)
        if bufs is not None and scales is not None:
            w.addcmul_(bufs[i], (-(lr_out * momentum) * scales[i]).to(w.dtype))


def _multi_tensor_lars(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                       scales: list[Tensor] | None, keep: Tensor, grad_norms: list[Tensor],
                       weight_norms: list[Tensor], *, lr: float | Tensor,
                       momentum: float, weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool,
                       paper_form: bool, clip: bool, adapt: bool, rescale: bool) -> None:
    lists = [params, grads, list(grad_norms), list(weight_norms)]
    lists += [bufs, scales] if bufs is not None and scales is not None else []
    for bucket in group_by_device_and_dtype(lists):
        ws, gs, g_norms, w_norms = bucket[0], bucket[1], bucket[2], bucket[3]
        d_coef, buf_decay, lr_out = _coefficients(
            keep.to(ws[0].device), torch.stack(w_norms), torch.stack(g_norms), lr=lr,
            momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            paper_form=paper_form, clip=clip, adapt=adapt)
        zero_nonfinite_(gs)
        step = lr_out * d_coef
        if len(bucket) > 4:
            bs, ss = bucket[4], bucket[5]
            if rescale:
                torch._foreach_mul_(bs, ss)
                torch._foreach_zero_(ss)
                torch._foreach_add_(ss, 1.0)
            torch._foreach_mul_(ss, list(buf_decay.unbind()))
            scale = torch.stack(ss)
            into = (d_coef / scale).to(ws[0].dtype)
            torch._foreach_addcmul_(bs, gs, list(into.unbind()))
            if weight_decay != 0:
                torch._foreach_addcmul_(bs, ws, list((into * weight_decay).unbind()))
            if not nesterov:
                torch._foreach_addcmul_(ws, bs, list((-lr_out * scale).to(ws[0].dtype).unbind()))
                continue
        if weight_decay != 0:
            torch._foreach_mul_(ws, list((1 - step * weight_decay).unbind()))
        torch._foreach_addcmul_(ws, gs, list((-step).unbind()))
        if len(bucket) > 4:
            torch._foreach_addcmul_(ws, bucket[4], list((-(lr_out * momentum) * scale).to(ws[0].dtype).unbind()))
