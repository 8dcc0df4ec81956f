"""Small helpers shared by the LARS, LAMB and RMSprop warm-up optimizers, and the skip contract.

* hyperparameter checks that name the argument, its value and the fix;
* gathering ``(params, grads)`` of a param group with a clear error for sparse gradients;
* the step's finiteness flag and trust ratios computed **on the device** (no ``.item()``, no Python
  branch on tensor values), as in optax's ``scale_by_trust_ratio`` (``jnp.where(zero_norm, 1.0, ratio)``).

The skip contract (every optimizer of the package follows it; :class:`~lightning_lbo.optim.kfac.KFAC` too):

* A step whose gradients are not all finite (any NaN or +-Inf in any parameter's gradient, in any
  param group) is skipped **as a whole**: no weight, moment, momentum buffer or step count moves, as if
  the batch had never been seen. The decision is one 0-d bool computed on the device.
* ``optimizer.nonfinite_skips`` is a 0-d ``int64`` tensor on the parameters' device counting the
  skipped steps. Reading its value is the caller's host sync (a logger does it once per logging
  interval); it is saved in ``state_dict()["nonfinite_skips"]``.
* ``optimizer.skip_next_step_where(bad)`` (0-d bool tensor) makes the next ``step()`` skip where
  ``bad`` is True, whatever the gradients; the Lightning callback uses it to skip a step whose loss
  was not finite. The request is consumed by that step; ``None`` withdraws it.

A skipped step edits non-finite gradients in place (their NaN/Inf entries read 0 afterwards, as
``GradScaler.unscale_`` edits gradients in place); finite gradients are left bit-identical. A weight that
is *already* non-finite is not repaired.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

NONFINITE_SKIPS = "nonfinite_skips"


class CheckedOptimizer(torch.optim.Optimizer):
    """What LARS, LAMB and RMSpropWarmup share: group validation, the skip contract, closure run once.

    Subclasses implement ``_check_group(group)`` (raise ``ValueError`` naming the bad hyperparameter); it
    runs for the defaults and for every group added, at construction or later. Their ``step`` calls
    :meth:`_step_keep` once with every gradient of the step and masks all updates with its result.
    """

    _skip_counter: Tensor | None = None
    _skip_request: Tensor | None = None

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @property
    def nonfinite_skips(self) -> Tensor:
        """Optimizer steps skipped for a non-finite gradient (or on request): 0-d int64 on the device, no sync."""
        if self._skip_counter is None:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self._skip_counter = torch.zeros((), dtype=torch.int64, device=device)
        return self._skip_counter

    def skip_next_step_where(self, bad: Tensor | None) -> None:
        """Skip the next step where the 0-d bool ``bad`` is True (decided on the device); ``None`` withdraws."""
        if bad is not None and (not isinstance(bad, Tensor) or bad.numel() != 1):
            raise TypeError(f"skip_next_step_where expects a one-element bool tensor or None, got {bad!r}.")
        self._skip_request = bad

    def _step_keep(self, grads: list[Tensor], grad_norms: list[Tensor] | None = None) -> Tensor:
        """The step's decision: True iff every gradient is finite and no skip was requested; counts a skip.

        ``grad_norms`` (one per gradient) are reused when the caller needs them anyway (LARS' trust
        ratio); otherwise they are computed here (one read of every gradient).
        """
        counter = self.nonfinite_skips
        if grads and counter.device != grads[0].device:  # the model moved after construction: follow it once
            counter = self._skip_counter = counter.to(grads[0].device)
        keep = all_finite(grads, grad_norms, counter.device)
        if self._skip_request is not None:
            keep = keep & ~self._skip_request.to(device=counter.device, dtype=torch.bool).reshape(())
            self._skip_request = None
        counter.add_((~keep).to(counter.dtype))
        return keep

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[NONFINITE_SKIPS] = self.nonfinite_skips.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        skips = state_dict.pop(NONFINITE_SKIPS, None)
        super().load_state_dict(state_dict)
        if skips is not None:
            self._skip_counter = torch.as_tensor(skips, dtype=torch.int64).to(self.nonfinite_skips.device).clone()

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """Run ``closure`` (which re-evaluates the loss) once under ``torch.enable_grad()``; None without one."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def all_finite(tensors: list[Tensor], norms: list[Tensor] | None = None, device: torch.device | None = None
               ) -> Tensor:
    """0-d bool on ``device`` (default: the first norm's): every tensor is finite, decided without a host sync.

    Decided from the tensors' norms (``norms``, if the caller has them, else one read of every tensor):
    their sum is finite iff every entry is, barring an overflow to inf, which is as bad.
    """
    if norms is None:
        norms = [n for bucket in group_by_device_and_dtype([tensors]) for n in torch._foreach_norm(bucket[0])]
    device = device or norms[0].device
    return torch.isfinite(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).sum())


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


def zero_nonfinite_(tensors: Tensor | list[Tensor]) -> None:
    """Set NaN and +-Inf entries to 0 in place (finite entries unchanged)."""
    for t in [tensors] if isinstance(tensors, Tensor) else tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


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
