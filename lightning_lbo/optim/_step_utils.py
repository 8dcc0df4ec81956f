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

Sharded parameters (``DTensor``, e.g. from ``torch.distributed.fsdp.fully_shard``): the step works on
each rank's local shard (plain tensors, so the foreach and fused kernels apply) and the only
communication is for norms: a norm of a whole parameter is ``sqrt`` of the sum over ranks of the
squared norms of its shards, all-reduced as one small vector per mesh (:func:`whole_norms`). The
finiteness decision is read from those whole norms, so every rank takes or skips the step together.
A ``DTensor``'s own ``vector_norm`` gives the same number but costs one collective per tensor and
DTensor dispatch on every op; ``full_tensor()`` would gather every parameter.

Checkpoints: ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (what Lightning's
``ModelParallelStrategy`` saves) keeps only ``state`` and ``param_groups``; so ``state_dict()`` also
writes the optimizer-wide counters into every param group (``nonfinite_skips`` as an int) and
``load_state_dict`` reads them from there when the top-level entry is missing. ``load_state_dict``
refuses a checkpoint whose state holds a NaN/Inf or a negative/fractional count, naming the entry.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

NONFINITE_SKIPS = "nonfinite_skips"

# A sharded tensor's layout for norm reductions: its mesh and the mesh dims it is sharded on (None: whole tensor).
ShardLayout = tuple[Any, tuple[int, ...]]


class CheckedOptimizer(torch.optim.Optimizer):
    """What LARS, LAMB and RMSpropWarmup share: group validation, the skip contract, closure run once.

    Subclasses implement ``_check_group(group)`` (raise ``ValueError`` naming the bad hyperparameter); it
    runs for the defaults and for every group added, at construction or later. Their ``step`` calls
    :meth:`_step_keep` once with every gradient of the step and masks all updates with its result.
    ``_STATE_COUNTS`` names per-parameter 0-d state entries that count steps (checked at load: finite
    whole numbers >= 0), ``_STATE_POSITIVE`` those that must be finite and > 0.
    """

    _skip_counter: Tensor | None = None
    _skip_request: Tensor | None = None
    _STATE_COUNTS: tuple[str, ...] = ()
    _STATE_POSITIVE: tuple[str, ...] = ()
    # optimizer-wide values also written into every param group of ``state_dict()`` (see the module docstring)
    _GROUP_COPIES: tuple[str, ...] = (NONFINITE_SKIPS,)
    # FSDP1 hands the optimizer flattened per-rank pieces of parameters: refused by optimizers whose step needs
    # whole-tensor norms (LARS, LAMB) or a rank-wide skip decision (all of them); KFAC decides for itself
    _REFUSES_FSDP1: bool = False

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, torch.nn.Module):
            name = type(self).__name__
            raise TypeError(f"{name} takes the parameters to optimize, not a module: pass module.parameters(), "
                            f"e.g. {name}(model.parameters(), ...) or {name}(self.parameters(), ...) in "
                            "configure_optimizers (or param groups: lightning_lbo.param_groups.param_groups(model)).")
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        # Placeholders (None) for the copies ``state_dict()`` writes into every group: the loader of
        # ``StateDictOptions(flatten_optimizer_state_dict=True)`` keeps only the group keys the live groups have.
        for key in self._GROUP_COPIES:
            self.param_groups[-1].setdefault(key, None)
        if self._REFUSES_FSDP1 and any(getattr(p, "_fsdp_flattened", False) for p in self.param_groups[-1]["params"]):
            self.param_groups.pop()
            name = type(self).__name__
            raise ValueError(
                f"{name} cannot run on FSDP1 parameters (FullyShardedDataParallel, Lightning's FSDPStrategy): each "
                "rank holds flattened pieces of parameters (even with use_orig_params=True), so per-tensor norms "
                "and the skip decision would be per-rank, silently wrong. Shard with fully_shard (FSDP2; "
                "Lightning's ModelParallelStrategy), which this optimizer supports, or use DDP."
            )

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

        ``grads`` may be sharded (``DTensor``); ``grad_norms`` (one per gradient, of the *whole*
        gradient) are reused when the caller needs them anyway (LARS' trust ratio); otherwise they are
        computed here (one read of every local shard, one all-reduce per mesh if sharded), so every rank
        decides alike.
        """
        counter = self.nonfinite_skips
        device = local_tensor(grads[0]).device if grads else counter.device
        if counter.device != device:  # the model moved after construction: follow it once
            counter = self._skip_counter = counter.to(device)
        if grad_norms is None:
            grad_norms = whole_norms(local_norms(grads), [shard_layout(g) for g in grads])
        keep = all_finite(grads, grad_norms, counter.device)
        if self._skip_request is not None:
            keep = keep & ~self._skip_request.to(device=counter.device, dtype=torch.bool).reshape(())
            self._skip_request = None
        counter.add_((~keep).to(counter.dtype))
        return keep

    def _group_copies(self) -> dict[str, Any]:
        """The optimizer-wide values written into every param group of ``state_dict()`` (plain Python values)."""
        return {NONFINITE_SKIPS: int(self.nonfinite_skips)}  # host read: saving a checkpoint is not a step

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[NONFINITE_SKIPS] = self.nonfinite_skips.clone()
        copies = self._group_copies()
        for group in state["param_groups"]:  # the packed copies, not the live groups
            group.update(copies)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` after checking it; a refused checkpoint leaves the optimizer as it was.

        Refused (``ValueError`` naming the entry): a NaN/Inf in any state tensor, a step count that is
        negative, fractional or not finite, a non-positive scale, a negative ``nonfinite_skips``.
        The optimizer-wide values come from the top level or, when an API kept only ``state`` and
        ``param_groups`` (``get_optimizer_state_dict``), from the param groups.
        """
        state_dict = dict(state_dict)
        groups = state_dict.get("param_groups", [])
        extras = {key: state_dict.pop(key, None) for key in self._GROUP_COPIES}
        for key in self._GROUP_COPIES:
            if extras[key] is None and groups and key in groups[0]:
                extras[key] = groups[0][key]
        self._check_loaded(state_dict, extras)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the copies are not hyperparameters: the live groups keep placeholders
            for key in self._GROUP_COPIES:
                group[key] = None
        self._load_extras(extras)

    def _load_extras(self, extras: dict[str, Any]) -> None:
        skips = extras.get(NONFINITE_SKIPS)
        if skips is not None:
            self._skip_counter = torch.as_tensor(skips, dtype=torch.int64).to(self.nonfinite_skips.device).clone()

    def _check_loaded(self, state_dict: dict[str, Any], extras: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad entry of a checkpoint (see :meth:`load_state_dict`)."""
        name = type(self).__name__
        fix = "; the checkpoint is corrupt or was saved after a divergence: resume from an earlier one."
        skips = extras.get(NONFINITE_SKIPS)
        if skips is not None:
            check_count(f"{name} checkpoint: {NONFINITE_SKIPS}", skips, fix)
        for i, group in enumerate(state_dict.get("param_groups", [])):
            count = group.get("steps_since_rescale")
            if count is not None:
                check_count(f"{name} checkpoint: param_groups[{i}]['steps_since_rescale']", count, fix)
        entries = [(f"state[{key!r}][{entry!r}]", entry, value)
                   for key, per_param in state_dict.get("state", {}).items() if isinstance(per_param, dict)
                   for entry, value in per_param.items()]
        tensors = [(label, value) for label, _, value in entries if isinstance(value, Tensor)]
        # one all-reduce per mesh for sharded entries, so every rank refuses (or accepts) the same checkpoint
        bad = sum_over_shards([(~torch.isfinite(local_tensor(t))).sum() for _, t in tensors],
                              [shard_layout(t) for _, t in tensors])
        for (label, value), n_bad in zip(tensors, [int(b) for b in bad], strict=True):
            if n_bad:
                raise ValueError(f"{name} checkpoint: {label} (shape {tuple(value.shape)}) holds {n_bad} "
                                 f"NaN/Inf entries{fix}")
        for label, entry, value in entries:
            if entry in self._STATE_COUNTS:
                check_count(f"{name} checkpoint: {label}", value, fix)
            if entry in self._STATE_POSITIVE and not float(value) > 0:
                raise ValueError(f"{name} checkpoint: {label} is {float(value)!r}, must be > 0{fix}")

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """Run ``closure`` (which re-evaluates the loss) once under ``torch.enable_grad()``; None without one."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def check_count(label: str, value: Any, fix: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` (a number or one-element tensor) is a finite whole number >= 0."""
    number = float(value) if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0 \
            or number != int(number):
        raise ValueError(f"{label} is {value!r}, must be a whole number >= 0{fix}")


def _dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` was imported (else no tensor can be one): no import cost."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view: in-place edits reach the DTensor), else ``t`` itself."""
    dtensor = _dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def shard_layout(t: Tensor) -> ShardLayout | None:
    """``(mesh, sharded mesh dims)`` of a sharded ``DTensor``; ``None`` when the local tensor is the whole tensor."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"A tensor of shape {tuple(t.shape)} has partial placements {t.placements}; the "
                         "optimizer needs parameters and gradients that are sharded or replicated (as fully_shard "
                         "leaves them).")
    dims = tuple(i for i, p in enumerate(t.placements) if p.is_shard())
    return (t.device_mesh, dims) if dims else None


def sum_over_shards(local_values: list[Tensor], layouts: Sequence[ShardLayout | None]) -> list[Tensor]:
    """Per-tensor 0-d values summed over the shards of each tensor (one all-reduce per mesh, in list order).

    Plain tensors' values are returned as they are. The order of the collectives follows the lists,
    which are the same on every rank (the same parameters in the same order).
    """
    out = list(local_values)
    by_layout: dict[ShardLayout, list[int]] = {}
    for i, layout in enumerate(layouts):
        if layout is not None:
            by_layout.setdefault(layout, []).append(i)
    for (mesh, dims), index in by_layout.items():
        dtype = local_values[index[0]].dtype
        for i in index[1:]:
            dtype = torch.promote_types(dtype, local_values[i].dtype)
        summed = torch.stack([local_values[i].to(dtype) for i in index])
        for dim in dims:
            torch.distributed.all_reduce(summed, group=mesh.get_group(dim))
        for i, value in zip(index, summed.unbind(), strict=True):
            out[i] = value.to(local_values[i].dtype)
    return out


def whole_norms(local_norms_: list[Tensor], layouts: Sequence[ShardLayout | None] | None) -> list[Tensor]:
    """Norms of whole tensors from their local shards' norms: ``sqrt(sum over ranks of ||shard||^2)``.

    ``layouts`` (from :func:`shard_layout`; ``None``: all tensors are whole) says which norms are of shards.
    """
    if layouts is None or all(layout is None for layout in layouts):
        return list(local_norms_)
    wide = [n.to(torch.promote_types(n.dtype, torch.float32)) for n in local_norms_]
    squares = [n * n if layout is not None else n for n, layout in zip(wide, layouts, strict=True)]
    summed = sum_over_shards(squares, layouts)
    return [s.sqrt().to(n.dtype) if layout is not None else n
            for s, n, layout in zip(summed, local_norms_, layouts, strict=True)]


def local_norms(tensors: list[Tensor]) -> list[Tensor]:
    """``||local shard||`` of each tensor (the tensor itself if not sharded), in order, with foreach norms."""
    locals_ = [local_tensor(t) for t in tensors]
    out: list[Tensor] = [torch.empty(0)] * len(locals_)
    for bucket, index in group_by_device_and_dtype([locals_, list(range(len(locals_)))]):
        for i, norm in zip(index, torch._foreach_norm(bucket), strict=True):
            out[i] = norm
    return out


def all_finite(tensors: list[Tensor], norms: list[Tensor] | None = None, device: torch.device | None = None
               ) -> Tensor:
    """0-d bool on ``device`` (default: the first norm's): every tensor is finite, decided without a host sync.

    Decided from the tensors' norms (``norms``, if the caller has them, else one read of every tensor):
    their sum is finite iff every entry is, barring an overflow to inf, which is as bad. Sharded tensors
    (``DTensor``) are read shard by shard and decided over the whole tensor (one all-reduce per mesh: every
    rank must call this, and every rank gets the same answer).
    """
    if norms is None:
        norms = whole_norms(local_norms(tensors), [shard_layout(t) for t in tensors])
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
