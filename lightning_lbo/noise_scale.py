"""The simple gradient noise scale ``B_simple`` of McCandlish et al. 2018 (arXiv 1812.06162), pure torch.

With per-sample gradients of mean ``G`` and covariance ``Sigma``, the mean gradient of ``B`` samples
satisfies ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch sizes ``B_small < B_big`` give unbiased
estimates of both terms (their Appendix A.1):

.. math::

    |\\mathcal{G}|^2 = \\frac{B_{big} |G_{big}|^2 - B_{small} |G_{small}|^2}{B_{big} - B_{small}},
    \\qquad
    \\mathcal{S} = \\frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}},
    \\qquad
    B_{simple} = \\mathcal{S} / |\\mathcal{G}|^2 .

Each term is noisy, so (as in the paper) the two are smoothed *separately* by exponential moving
averages and their ratio is reported. ``B_simple`` estimates the batch size beyond which a larger
batch stops buying proportionally fewer steps.

Where the two norms come from (see :class:`MicroBatchGradNorms`): ``G_small`` is a gradient of one
micro-batch on one process, taken by a tensor hook *before* it is accumulated into ``.grad`` (so before
DistributedDataParallel averages it), ``G_big`` the final gradient the optimizer sees (averaged over
micro-batches and ranks). Both are squared norms of *mean*-loss gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_lbo._dtensor import is_dtensor, local_tensor, refuse_dtensors
from lightning_lbo.capture import capture_paused


def noise_scale_terms(small_sq: torch.Tensor, big_sq: torch.Tensor, b_small: float, b_big: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates ``(|G|^2, tr(Sigma))`` from mean squared norms at two batch sizes.

    Args:
        small_sq: ``E|G_small|^2`` estimate (a mean over several small batches is allowed).
        big_sq: ``|G_big|^2``.
        b_small, b_big: the two batch sizes, ``b_small < b_big``.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"Invalid batch sizes: b_small={b_small}, b_big={b_big}; need 0 < b_small < b_big.")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class NoiseScaleEstimator:
    """EMA-smoothed ``|G|^2`` and ``tr(Sigma)``; their ratio is ``B_simple``. No host synchronisation.

    Args:
        beta: EMA decay per update (0 keeps only the last step). The EMAs are bias-corrected.

    Non-finite updates (overflowing gradients) leave the averages unchanged and are counted in
    :attr:`skipped`.

    Example::

        est = NoiseScaleEstimator(beta=0.95)
        est.update(small_sq, big_sq, b_small=128, b_big=1024)
        est.b_simple()  # tensor
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta}; use a value in [0, 1).")
        self.beta = beta
        self.ema = torch.zeros(2, dtype=torch.float64)  # [|G|^2, tr(Sigma)], un-normalised EMA
        self.weight = torch.zeros((), dtype=torch.float64)  # sum of EMA weights (bias correction)
        self.skipped = torch.zeros((), dtype=torch.int64)
        self.updates = 0

    def update(self, small_sq: torch.Tensor, big_sq: torch.Tensor, b_small: float, b_big: float) -> None:
        """Fold one step's pair of squared norms into the averages."""
        terms = torch.stack(noise_scale_terms(small_sq.double(), big_sq.double(), b_small, b_big))
        if self.ema.device != terms.device:
            self.ema, self.weight, self.skipped = (t.to(terms.device) for t in (self.ema, self.weight, self.skipped))
        finite = torch.isfinite(terms).all()
        self.ema = torch.where(finite, self.beta * self.ema + (1 - self.beta) * terms, self.ema)
        self.weight = torch.where(finite, self.beta * self.weight + (1 - self.beta), self.weight)
        self.skipped += (~finite).long()
        self.updates += 1

    def grad_sq(self) -> torch.Tensor:
        """Smoothed ``|G|^2`` (nan before the first finite update)."""
        return self.ema[0] / self.weight

    def trace(self) -> torch.Tensor:
        """Smoothed ``tr(Sigma)``."""
        return self.ema[1] / self.weight

    def b_simple(self) -> torch.Tensor:
        """``tr(Sigma) / |G|^2`` of the smoothed terms (the bias correction cancels)."""
        return self.ema[1] / self.ema[0]

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "ema": self.ema.cpu(), "weight": self.weight.cpu(), "skipped": self.skipped.cpu(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state.get("beta", self.beta)
        self.ema = state.get("ema", self.ema).clone().to(torch.float64)
        self.weight = state.get("weight", self.weight).clone().to(torch.float64)
        self.skipped = state.get("skipped", self.skipped).clone()
        self.updates = state.get("updates", self.updates)


class MicroBatchGradNorms:
    """Sum of squared norms of each backward's *own* gradient, per process, before accumulation.

    A hook on each parameter (``Tensor.register_hook`` on a leaf) sees the gradient this backward
    contributes, before autograd adds it to ``.grad`` and before DistributedDataParallel's reducer
    (which acts on the accumulated gradient) averages it across ranks. Summed over parameters and
    backward passes, :meth:`pop` returns ``sum_i |g_i|^2`` over the micro-batches since the last pop.
    Passes inside :func:`lightning_lbo.capture.curvature_capture_paused` (HVPs, FGSM) are ignored.

    Args:
        params: the parameters whose gradient norm is measured (those the optimizer updates).

    :attr:`enabled` (default ``True``) switches the measurement off without unregistering the hooks:
    with a single batch size (one process, no accumulation) nobody reads these norms, and a squared
    norm per parameter per backward would be pure overhead.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MicroBatchGradNorms needs at least one parameter that requires grad.")
        refuse_dtensors(self.params, "MicroBatchGradNorms", "Measure per-rank gradients with unsharded parameters "
                        "(DDP).")
        self.enabled = True
        self._sq: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._hook) for p in self.params]

    def _hook(self, grad: torch.Tensor) -> None:
        if self.enabled and not capture_paused():
            self._sq.append(grad.detach().float().pow(2).sum())  # list.append is atomic: safe from device threads

    def pop(self) -> torch.Tensor:
        """``sum_i |g_i|^2`` since the last call (0-d float32 tensor, on the parameters' device)."""
        sq, self._sq = self._sq, []
        if not sq:
            return torch.zeros((), device=self.params[0].device)
        return torch.stack(sq).sum()

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sq = []


class ShardedMicroBatchGradNorms:
    """Squared norms of each micro-batch's *global* gradient under sharded data parallel (``fully_shard``).

    FSDP2 reduce-scatters every backward's gradient (rank-averaged) into the sharded ``.grad``, adding it
    to what the accumulation window holds, so no rank ever sees its own gradient (what
    :class:`MicroBatchGradNorms` reads under DDP). What can be read is the contribution of each micro-batch
    to the accumulated gradient: ``.grad`` after its backward minus ``.grad`` before it, the gradient of
    the micro-batch of *all* ranks (``B_small`` = per-device batch x ranks; ``B_big`` adds the
    micro-batches of the window). Shards are disjoint, so a squared norm is the sum over ranks of the
    squared norms of the local shards: kept on the device per micro-batch, summed over ranks once per
    optimizer step (:meth:`pop`, one collective of two numbers). Memory: one copy of this rank's
    gradient shards.

    Args:
        params: the parameters, all DTensors sharded (``Shard`` placements only) over a mesh of ``world_size`` ranks.
        world_size: the number of ranks the shards are spread over.
        all_reduce_sum: sums a tensor over those ranks and returns it (a collective).
    """

    def __init__(self, params: Iterable[torch.Tensor], world_size: int,
                 all_reduce_sum: Any) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ShardedMicroBatchGradNorms needs at least one parameter that requires grad.")
        for p in self.params:
            if not (is_dtensor(p) and p.device_mesh.size() == world_size and all(pl.is_shard() for pl in p.placements)):
                what = (f"a DTensor with placements {tuple(p.placements)} over {p.device_mesh.size()} ranks"
                        if is_dtensor(p) else "a plain tensor")
                raise ValueError(f"ShardedMicroBatchGradNorms needs every parameter sharded over all {world_size} "
                                 f"ranks (fully_shard on the data-parallel mesh), found {what}: replicated pieces "
                                 "would be counted once per replica.")
        self.all_reduce_sum = all_reduce_sum
        self._previous: list[torch.Tensor] | None = None  # this rank's shards of .grad after the last backward
        self._sq: list[torch.Tensor] = []

    def start_window(self) -> None:
        """A new accumulation window: ``.grad`` starts from nothing (Lightning zeroes it)."""
        if self._previous is not None:
            torch._foreach_zero_(self._previous)
        self._sq = []

    def after_backward(self) -> None:
        """Record the squared norm (this rank's shards) of what the backward just added to ``.grad``."""
        if self._previous is None:
            self._previous = [torch.zeros_like(local_tensor(p.detach())) for p in self.params]
        current = [local_tensor(p.grad.detach()) if p.grad is not None else prev
                   for p, prev in zip(self.params, self._previous, strict=True)]
        added = torch._foreach_sub(current, self._previous)
        self._sq.append(torch.stack([n.double() for n in torch._foreach_norm(added)]).pow(2).sum())
        torch._foreach_copy_(self._previous, current)

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(sum_i |g_i|^2, |grad|^2, micro-batches)`` over all ranks since :meth:`start_window` (a collective).

        ``g_i`` is the i-th backward's contribution to the accumulated gradient, ``grad`` the accumulated
        gradient itself (what the optimizer steps with).
        """
        count, sq = len(self._sq), self._sq
        self._sq = []
        device = self._previous[0].device if self._previous else self.params[0].device
        total = torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64, device=device)
        final = (torch.stack([n.double() for n in torch._foreach_norm(self._previous)]).pow(2).sum()
                 if self._previous else torch.zeros((), dtype=torch.float64, device=device))
        both = self.all_reduce_sum(torch.stack([total, final]))
        return both[0], both[1], count


def grad_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``|grad|^2`` over parameters with a gradient (multi-tensor norm, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("No parameter has a gradient.")
    return torch.stack(torch._foreach_norm([g.float() for g in grads])).pow(2).sum()


def split_batch_sq_norms(model: torch.nn.Module, batch: Any, params: Iterable[torch.Tensor],
                         loss_fn: Any = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(E|G_small|^2, |G_big|^2, B_small, B_big)`` from the two halves of one batch.

    For one process without gradient accumulation (no second batch size to compare): the mean-loss
    gradients ``g_1, g_2`` of the two halves (``B_small = B // 2`` samples each) give
    ``E|G_small|^2 ~ (|g_1|^2 + |g_2|^2) / 2`` and ``G_big = (g_1 + g_2) / 2`` over ``B_big = 2 B_small``.
    Costs one extra forward and backward of the batch, with batch-norm statistics of each half and the
    running buffers restored (:func:`lightning_lbo.hessian.hvp.batch_norm_mode`); ``.grad`` is untouched
    (``torch.autograd.grad``), and the passes are hidden from curvature hooks and
    :class:`MicroBatchGradNorms`. Under DDP pass the unwrapped module: each rank measures its own batch.

    Args:
        model: the module (``model(x)`` logits).
        batch: ``(x, y, ...)``; an odd last sample is left out.
        params: the parameters whose gradient is measured.
        loss_fn: ``loss_fn(model, batch) -> mean loss`` (default: the ``(x, y)`` / ``model.loss_fn`` contract).
    """
    from lightning_lbo.capture import curvature_capture_paused
    from lightning_lbo.hessian.hvp import batch_norm_mode, classifier_loss

    loss_fn = loss_fn or classifier_loss
    params = [p for p in params if p.requires_grad]
    refuse_dtensors(params, "split_batch_sq_norms", "Measure with unsharded parameters (DDP, or one process).")
    n = int(batch[0].shape[0]) // 2
    if n < 1:
        raise ValueError(f"A batch of {batch[0].shape[0]} samples cannot be split in two halves: use batches >= 2.")
    halves = [tuple(t[i * n:(i + 1) * n] for t in batch) for i in range(2)]
    grads = []
    with curvature_capture_paused(), torch.inference_mode(False), torch.enable_grad(), \
            batch_norm_mode(model, "train"):
        for half in halves:
            grads.append(torch.autograd.grad(loss_fn(model, half), params, allow_unused=True))
    g1 = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[0], params, strict=True)]
    g2 = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1], params, strict=True)]
    sq1 = torch.stack(torch._foreach_norm(g1)).pow(2).sum()
    sq2 = torch.stack(torch._foreach_norm(g2)).pow(2).sum()
    big = torch.stack(torch._foreach_norm(torch._foreach_add(g1, g2))).pow(2).sum() / 4
    return (sq1 + sq2) / 2, big, n, 2 * n
