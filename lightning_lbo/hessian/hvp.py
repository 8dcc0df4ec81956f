"""Hessian-vector products of a model's loss over fixed batches (pure torch, DDP-aware).

The operator is the Hessian of the *sample-weighted mean* loss over every batch it is given,
on every process:

.. math::

    H = \\frac{\\sum_{r} \\sum_{b \\in r} n_b \\nabla^2_\\theta L_b(\\theta)}{\\sum_r \\sum_{b \\in r} n_b},
    \\qquad H v = \\nabla_\\theta \\left( \\nabla_\\theta L(\\theta)^\\top v \\right)

(Pearlmutter's trick: two backward passes, no Hessian is formed). ``L_b`` is the mean loss of batch
``b`` with ``n_b`` samples, ``r`` runs over the ranks of an initialised ``torch.distributed`` group.
``torch.autograd.grad`` bypasses DistributedDataParallel's reducer, so the numerator and the sample
count are all-reduced explicitly (one collective per product): N ranks holding B/N samples each give
the same operator as one process holding all B.

Vectors are flat tensors ``[num_params]`` over the selected parameters (in the order of
:attr:`HessianOperator.params`), in the parameters' dtype (:attr:`HessianOperator.dtype`: float64
for a float64 model, float32 for float32 and for half-precision parameters), whatever
``torch.get_default_dtype()`` is; :meth:`HessianOperator.unflatten` splits one into parameter shapes.

Batch-norm mode is explicit: ``"eval"`` (default) differentiates the network with its running
statistics, the function used at test time and the paper's choice (Yao et al. 2018); ``"train"`` uses
batch statistics, with scratch copies of the running buffers so the model is left exactly as it was.
Every pass runs in :func:`lightning_lbo.capture.curvature_capture_paused`
with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_lbo._dtensor import refuse_dtensors
from lightning_lbo.capture import curvature_capture_paused
from lightning_lbo.compat import batch_norm_base

#: ``loss_fn(model, batch) -> scalar mean loss`` and ``count_fn(batch) -> number of samples``.
LossFn = Callable[[nn.Module, Any], torch.Tensor]
CountFn = Callable[[Any], int]
BN_MODES = ("eval", "train")


def classifier_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The lightning_lbo contract: ``batch = (x, y)``, ``model(x)`` logits, ``model.loss_fn`` or cross-entropy."""
    x, y = batch[0], batch[1]
    loss_fn = getattr(model, "loss_fn", None) or nn.functional.cross_entropy
    return loss_fn(model(x), y)


def first_dim_count(batch: Any) -> int:
    """Number of samples of a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (torch.Tensor, list, tuple, dict)):
                return first_dim_count(item)
    raise TypeError(f"Cannot count the samples of a batch of type {type(batch).__name__}; pass count_fn.")


def parameters_of(*modules: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of one or more modules (a layer, a block), without duplicates."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def parameters_of_type(model: nn.Module, types: type | tuple[type, ...]) -> list[nn.Parameter]:
    """Trainable parameters of the submodules of ``model`` that are instances of ``types``."""
    return parameters_of(*(m for m in model.modules() if isinstance(m, types)))


def per_module_parameters(model: nn.Module, types: type | tuple[type, ...] = (nn.Linear, nn.Conv2d)
                          ) -> dict[str, list[nn.Parameter]]:
    """``{qualified module name: its parameters}`` for each submodule of ``types`` (per-layer spectra)."""
    return {name: parameters_of(m) for name, m in model.named_modules() if isinstance(m, types) and parameters_of(m)}


@contextmanager
def batch_norm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put the model in ``mode`` ("eval" or "train") and restore every module's flag and BN buffers after."""
    if mode not in BN_MODES:
        raise ValueError(f"Invalid bn_mode: {mode!r}. Supported: {BN_MODES}.")
    flags = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, batch_norm_base())]
    # Batch statistics update the running buffers in place: give the modules scratch copies and put the
    # originals back afterwards (no in-place write to the originals, so cached graphs stay valid). Assigning
    # a tensor to a registered buffer's name replaces the buffer (nn.Module.__setattr__).
    saved = [dict(m.named_buffers(recurse=False)) for m in norms]
    model.train(mode == "train")
    if mode == "train":
        for m, buffers in zip(norms, saved, strict=True):
            for k, b in buffers.items():
                if b is not None:
                    setattr(m, k, b.detach().clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved, strict=True):
            for k, b in buffers.items():
                setattr(m, k, b)
        for m, flag in flags:
            m.training = flag


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def vector_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of flat vectors over ``params``: their promoted floating dtype, at least float32."""
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.promote_types(dtype, torch.float32)  # half/bfloat16 parameters: products summed in float32


class HVPBudgetExceeded(RuntimeError):
    """Raised when an algorithm asks for more Hessian-vector products than its budget allows."""


class HessianOperator:
    """The (sample-weighted, all-ranks) Hessian of a model's loss over fixed batches, as a linear operator.

    Args:
        model: the network (the unwrapped module, not a ``DistributedDataParallel`` wrapper).
        batches: the fixed batches of *this* rank (each is passed to ``loss_fn`` as is, already on device).
        loss_fn: ``loss_fn(model, batch)`` returns the batch's mean loss (default: :func:`classifier_loss`).
        params: the parameters the Hessian is taken over (a layer or a block: :func:`parameters_of`);
            default: all trainable parameters.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics, buffers restored).
        distributed: all-reduce products over ``group`` when ``torch.distributed`` is initialised
            (default True; every rank must then call the operator the same number of times).
        group: the process group (default: the world).
        count_fn: number of samples of a batch, the weight of its loss (default: leading dimension).
        max_hvps: budget; a product beyond it raises :class:`HVPBudgetExceeded` (None: unlimited).
        cache_graph: with a single batch, keep the first backward's graph and reuse it for every product
            (one double-backward per product instead of forward + 2 backwards; costs activation memory).
        sync_buffers: when distributed, copy the model's buffers (BN running statistics) from the group's
            first rank to all ranks at construction, so every rank differentiates the same function. This is
            what DistributedDataParallel (``broadcast_buffers=True``) does before its next forward anyway;
            without it each rank's running statistics differ after a training step.

    Example::

        op = HessianOperator(model, [(x, y)], params=parameters_of(model.layer1))
        hv = op.matvec(torch.randn(op.numel, dtype=op.dtype))
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], loss_fn: LossFn = classifier_loss,
                 params: Iterable[torch.Tensor] | None = None, bn_mode: str = "eval", distributed: bool = True,
                 group: Any = None, count_fn: CountFn = first_dim_count, max_hvps: int | None = None,
                 cache_graph: bool = True, sync_buffers: bool = True) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"Invalid bn_mode: {bn_mode!r}. Supported: {BN_MODES}.")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("Pass the unwrapped module (ddp_model.module): HVPs bypass DDP and are all-reduced here.")
        batches = list(batches)
        if not batches:
            raise ValueError("HessianOperator needs at least one batch.")
        if max_hvps is not None and max_hvps < 1:
            raise ValueError(f"Invalid max_hvps: {max_hvps}; use a positive integer or None.")
        self.model, self.batches, self.loss_fn, self.count_fn = model, batches, loss_fn, count_fn
        self.params = list(params) if params is not None else parameters_of(model)
        if not self.params or not all(p.requires_grad for p in self.params):
            raise ValueError("params must be a non-empty list of tensors that require grad.")
        refuse_dtensors(self.params, "HessianOperator", "Build the operator inside "
                        "lightning_lbo._dtensor.fsdp_unsharded(model), which holds the full parameters, or use DDP.")
        self.bn_mode, self.group, self.max_hvps = bn_mode, group, max_hvps
        self.distributed = distributed and _distributed(group)
        self.cache_graph = cache_graph and len(batches) == 1
        self.numel = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.dtype = vector_dtype(self.params)
        self.num_hvps = 0
        self._cached: tuple[torch.Tensor, ...] | None = None
        if self.distributed and sync_buffers:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=src, group=group)
        local = float(sum(count_fn(b) for b in batches))
        self.local_samples = local
        self.total_samples = self._all_reduce(torch.tensor([local], dtype=torch.float64, device=self.device)).item()

    # ------------------------------------------------------------------ helpers
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector ``[numel]`` into tensors shaped like :attr:`params`."""
        chunks = torch.split(v, [p.numel() for p in self.params])
        return [c.view_as(p) for c, p in zip(chunks, self.params, strict=True)]

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors into a flat vector of :attr:`dtype` (None counts as zeros)."""
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).to(self.dtype)
                          for t, p in zip(tensors, self.params, strict=True)])

    @contextmanager
    def _context(self) -> Iterator[None]:
        with curvature_capture_paused(), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(self.device.type, enabled=False), batch_norm_mode(self.model, self.bn_mode):
            yield

    def _grads(self, batch: Any) -> tuple[torch.Tensor, ...]:
        loss = self.loss_fn(self.model, batch)
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _check_budget(self, n: int = 1) -> None:
        if self.max_hvps is not None and self.num_hvps + n > self.max_hvps:
            raise HVPBudgetExceeded(f"HVP budget of {self.max_hvps} exhausted ({self.num_hvps} used).")

    def remaining(self) -> int | None:
        """HVPs left in the budget (None: unlimited)."""
        return None if self.max_hvps is None else self.max_hvps - self.num_hvps

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` ``[numel]``; returns a flat vector of :attr:`dtype`."""
        self._check_budget()
        vs = [c.to(p.dtype) for c, p in zip(self.unflatten(v.to(self.device)), self.params, strict=True)]
        total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with self._context():
            for batch in self.batches:
                if self.cache_graph:
                    if self._cached is None:
                        self._cached = self._grads(batch)
                    grads = self._cached
                else:
                    grads = self._grads(batch)
                # Gradients that do not depend on the parameters (None / constant) contribute nothing.
                used = [(g, x) for g, x in zip(grads, vs, strict=True) if g is not None and g.requires_grad]
                hv: Sequence[torch.Tensor | None] = [None] * len(self.params)
                if used:
                    hv = torch.autograd.grad([g for g, _ in used], self.params, grad_outputs=[x for _, x in used],
                                             retain_graph=self.cache_graph, allow_unused=True)
                total.add_(self.flatten(hv), alpha=float(self.count_fn(batch)))
        self.num_hvps += 1
        return self._all_reduce(total).div_(self.total_samples)

    def release(self) -> None:
        """Drop the cached graph (frees activation memory)."""
        self._cached = None

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def dense(self) -> torch.Tensor:
        """The full ``[numel, numel]`` matrix, one product per column (tests and tiny models only)."""
        eye = torch.eye(self.numel, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.numel)], dim=1)
