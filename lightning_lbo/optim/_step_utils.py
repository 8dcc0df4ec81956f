"""Small helpers shared by the LARS, LAMB and RMSprop warm-up optimizers.

* hyperparameter checks that name the argument, its value and the fix;
* gathering ``(params, grads)`` of a param group with a clear error for sparse gradients;
* per-tensor finiteness masks and trust ratios computed **on the device** (no ``.item()``,
  no Python branch on tensor values), as in optax's ``scale_by_trust_ratio``
  (``jnp.where(zero_norm, 1.0, ratio)``).

A non-finite gradient makes the whole tensor's update a no-op: every per-tensor coefficient is masked
to 0 (the decay factors to 1) on the device, and the gradient's non-finite entries are set to 0 *in
place* (``torch.nan_to_num_``: one cheap in-place pass, where an out-of-place ``torch.where`` copy would
cost an allocation per tensor), so NaN/Inf never reaches weights or optimizer state. Like
``GradScaler.unscale_``, the step thus edits a skipped tensor's ``.grad`` in place: its non-finite
entries read 0 afterwards (LAMB and RMSpropWarmup zero the whole gradient of a skipped tensor); finite
gradients are left bit-identical. A weight that is *already* non-finite
is not repaired.
Each skip is counted in the parameter's ``state["nonfinite_skips"]`` (a 0-d tensor on the
parameter's device) that a callback or the user reads when it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

NONFINITE_SKIPS = "nonfinite_skips"


class CheckedOptimizer(torch.optim.Optimizer):
    """What LARS, LAMB and RMSpropWarmup share: every param group validated, skips counted, closure run once.

    Subclasses implement ``_check_group(group)`` (raise ``ValueError`` naming the bad hyperparameter); it
    runs for the defaults and for every group added, at construction or later.
    """

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def nonfinite_skips(self) -> Tensor:
        """Total number of tensor updates skipped for a non-finite gradient (device tensor, no sync)."""
        return total_nonfinite_skips(self)

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """Run ``closure`` (which re-evaluates the loss) once under ``torch.enable_grad()``; None without one."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def check_non_negative(name: str, value: Any, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    if isinstance(value, Tensor):
        return  # tensor hyperparameters (e.g. an LR set by a compiled scheduler) are the caller's business
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0 or value == float("inf"):
        raise ValueError(f"Invalid {name}: {value!r}; use a finite value >= 0{hint}.")


def check_momentum(value: Any, name: str = "momentum") -> None:
    """Momentum-like coefficients must lie in [0, 1): 1 never forgets, above 1 diverges."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; use a value in [0, 1) (0.9 is the usual choice).")


def params_with_grads(group: dict[str, Any], optimizer_name: str) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``group`` that have a gradient, and those gradients."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{optimizer_name} does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                "use dense gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam for that parameter."
            )
        params.append(p)
        grads.append(p.grad)
    return params, grads


def skip_counters(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    """Each parameter's non-finite skip counter, created (0) on first use."""
    counters = []
    for p in params:
        state = optimizer.state[p]
        if NONFINITE_SKIPS not in state:
            state[NONFINITE_SKIPS] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif state[NONFINITE_SKIPS].dtype != torch.float32:  # load_state_dict casts state to a half param's dtype
            state[NONFINITE_SKIPS] = state[NONFINITE_SKIPS].to(torch.float32)
        counters.append(state[NONFINITE_SKIPS])
    return counters


def total_nonfinite_skips(optimizer: torch.optim.Optimizer) -> Tensor:
    """Sum of all skip counters (a device tensor; reading its value is the caller's host sync)."""
    counters = [s[NONFINITE_SKIPS] for s in optimizer.state.values() if NONFINITE_SKIPS in s]
    if not counters:
        return torch.zeros(())
    device = counters[0].device
    return torch.stack([c.to(device=device, dtype=torch.float32) for c in counters]).sum()


def finite_mask(*norms: Tensor) -> Tensor:
    """True where every norm is finite (a tensor's norm is NaN/Inf iff an entry is, barring overflow)."""
    mask = torch.isfinite(norms[0])
    for n in norms[1:]:
        mask = mask & torch.isfinite(n)
    return mask


def zero_nonfinite_(tensors: Tensor | list[Tensor]) -> None:
    """Set NaN and +-Inf entries to 0 in place (finite entries unchanged)."""
    for t in [tensors] if isinstance(tensors, Tensor) else tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def masked(tensor: Tensor, keep: Tensor) -> Tensor:
    """``tensor`` where ``keep`` (0-d bool) is True, zeros elsewhere: NaN-safe, unlike multiplying by 0."""
    return torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, *, trust_coefficient: float, weight_decay: float, eps: float,
                     lr: float | Tensor, clip: bool) -> Tensor:
    """LARS local LR ``eta ||w|| / (||g|| + beta ||w|| + eps)`` (You et al. 2017, eq. 6), elementwise over norms.

    With ``clip`` (LARC) the ratio is ``min(local_lr / lr, 1)`` so that ``lr * ratio = min(local_lr, lr)``.
    A zero weight or gradient norm gives 1 (MLPerf reference); the ratio is never clipped then.
    """
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    if clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach=None`` picks the multi-tensor path for plain tensors (fewer Python-level ops on every device)."""
    if foreach is not None:
        return foreach
    return all(type(p) in (Tensor, torch.nn.Parameter) for p in params)


def group_by_device_and_dtype(tensor_lists: list[list[Tensor]]) -> list[list[list[Tensor]]]:
    """Split parallel tensor lists into sub-lists sharing device and dtype (what ``torch._foreach_*`` need)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for i, ref in enumerate(tensor_lists[0]):
        bucket = buckets.setdefault((ref.device, ref.dtype), [[] for _ in tensor_lists])
        for lst, out in zip(tensor_lists, bucket, strict=True):
            out.append(lst[i])
    return list(buckets.values())
