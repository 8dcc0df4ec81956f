r"""Batch-norm statistics for evaluation without moving averages, and ghost batch norm (pure torch).

Two estimators of the ``running_mean`` / ``running_var`` a BatchNorm layer uses in eval mode:

* **Last minibatches** (Akiba, Suzuki, Fukuda 2017, arXiv 1711.04325, section 3): use the statistics
  of the last training minibatch(es), pooled over all workers, instead of exponential moving
  averages. :class:`BatchNormMomentRecorder` keeps the per-channel moments of the last ``k``
  training-mode forward passes of every BN layer (forward pre-hooks; no host sync).
* **Precise BN** (the "precise BN" of Wu & Johnson 2021, arXiv 2105.07576): recompute the population
  statistics of the BN inputs over ``N`` training batches with the current weights
  (:func:`estimate_precise_stats`).

Moments. For one layer with ``C`` channels and an input ``x`` of shape ``[B, C, *]`` the moments of
a batch are ``(n, mean, m2)`` with ``n = x.numel() / C`` values per channel, ``mean`` ``[C]`` and
``m2`` ``[C]`` the sum of squared deviations from ``mean``. Pooling batches ``i`` (Chan, Golub,
LeVeque 1979):

.. math::

    N = \sum_i n_i, \qquad \mu = \frac{1}{N}\sum_i n_i \mu_i, \qquad
    M_2 = \sum_i M_{2,i} + \sum_i n_i (\mu_i - \mu)^2,

so ``M2 / N`` is the count-weighted mean of the batch variances plus the count-weighted variance of
the batch means: Akiba's pooled variance, and exactly ``E[x^2] - E[x]^2`` over all values seen.
(Cumulative averaging of per-batch variances, torch's ``momentum=None`` and ``update_bn``, keeps only
the first term.) Across ranks the same pooling is done with two sum all-reduces over one flat buffer
for all layers (:func:`reduce_moments`): counts and sums first, then ``M2`` about the global mean.

Ghost batch norm (Hoffer, Hubara, Soudry 2017, arXiv 1705.08741): :class:`GhostBatchNorm1d` /
``2d`` / ``3d`` normalise virtual batches of ``g`` rows of the per-device batch separately in training
(:func:`ghost_chunk_sizes`), :func:`convert_to_ghost_batchnorm` converts a model, and
``layer.normalized_input(x)`` gives the ghost-normalised input for curvature blocks.

Convention. torch stores the *unbiased* batch variance in ``running_var``. We install
``running_var = M2 / (N - 1)`` with ``N`` the total count: the statistics are those a BN layer with
``momentum=1`` would store after one batch holding all the pooled values. Accumulation is in
float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_lbo._checks import positive_int
from lightning_lbo.capture import capture_paused, curvature_capture_paused

#: Sums a tensor over all ranks and returns the result (``torch.distributed.all_reduce`` or a
#: Lightning strategy's ``reduce(t, reduce_op="sum")``).
ReduceSum = Callable[[Tensor], Tensor]


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """BatchNorm1d/2d/3d and SyncBatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on devices without it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


# Device types whose ATen lacks ``batch_norm_update_stats`` (found at the first call, then var_mean).
_NO_FUSED_STATS: set[str] = set()


def batch_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Per-channel ``(n, mean [C], m2 [C])`` of a BN input ``x`` of shape ``[B, C, *]``.

    Uses the fused one-pass kernel BatchNorm itself uses (``torch.batch_norm_update_stats``, biased
    variance; 2-3x faster than ``var_mean`` over several dims on CPU), falling back to ``var_mean``.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.numel() // x.shape[1]
    if x.device.type not in _NO_FUSED_STATS:
        try:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return n, mean, var * n
        except (AttributeError, NotImplementedError, RuntimeError):
            _NO_FUSED_STATS.add(x.device.type)
    var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return n, mean, var * n


def pool_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool ``K`` sets of moments: ``counts [K]``, ``means [K, C]``, ``m2s [K, C]`` -> ``(N, mean, M2)``."""
    total = counts.sum()
    weights = counts / total.clamp_min(1)
    mean = (weights[:, None] * means).sum(0)
    m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    return total, mean, m2


def default_reduce_sum() -> ReduceSum | None:
    """``torch.distributed`` all-reduce (sum) when a process group with several ranks exists, else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def reduce_sum(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return reduce_sum


def reduce_moments(counts: Tensor, means: Sequence[Tensor], m2s: Sequence[Tensor], extra: Tensor,
                   reduce_sum: ReduceSum | None) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Pool per-layer moments over ranks with two sum-reductions (one flat buffer each).

    Args:
        counts: ``[L]`` values per channel of each layer on this rank (0 for a layer not run).
        means, m2s: per layer ``[C_l]``, this rank's pooled mean and M2.
        extra: ``[E]`` numbers summed along (sample and batch counts).
        reduce_sum: sums a tensor over ranks; None for a single process.

    Returns:
        Global ``counts [L]``, ``means``, ``m2s`` and the summed ``extra``.
    """
    if reduce_sum is None:
        return counts, list(means), list(m2s), extra
    sizes = [m.numel() for m in means]
    first = reduce_sum(torch.cat([counts, extra, *[c * m for c, m in zip(counts, means, strict=True)]]))
    num_layers = counts.numel()
    g_counts, g_extra = first[:num_layers], first[num_layers:num_layers + extra.numel()]
    g_sums = first[num_layers + extra.numel():].split(sizes)
    g_means = [s / c.clamp_min(1) for s, c in zip(g_sums, g_counts, strict=True)]
    # M2 of this rank about the global mean; summing these over ranks gives the global M2.
    local = [m2 + c * (m - gm) ** 2 for m2, c, m, gm in zip(m2s, counts, means, g_means, strict=True)]
    g_m2s = list(reduce_sum(torch.cat(local)).split(sizes))
    return g_counts, g_means, g_m2s, g_extra


@dataclass
class BatchNormStatistics:
    """Pooled statistics for a list of BN layers, ready to install as their running statistics.

    Attributes:
        layers: the BN layers, in module order.
        counts: ``[L]`` values per channel behind each layer's statistics (all ranks).
        means, variances: per layer ``[C]``; ``variances`` is unbiased over the total count.
        num_samples: examples (batch rows at the first BN layer) behind the statistics, all ranks.
        num_batches: batches behind the statistics, summed over ranks.
        skipped: indices of layers with fewer than 2 values (not run): :meth:`install` leaves them.
    """

    layers: list[_BatchNorm]
    counts: Tensor
    means: list[Tensor]
    variances: list[Tensor]
    num_samples: int
    num_batches: int
    skipped: list[int] = field(default_factory=list)

    @classmethod
    def from_moments(cls, layers: list[_BatchNorm], counts: Tensor, means: list[Tensor], m2s: list[Tensor],
                     num_samples: int, num_batches: int) -> BatchNormStatistics:
        variances = [m2 / (c - 1).clamp_min(1) for m2, c in zip(m2s, counts, strict=True)]
        skipped = [i for i, c in enumerate(counts.tolist()) if c < 2]
        return cls(layers, counts, means, variances, num_samples, num_batches, skipped)

    @torch.no_grad()
    def install(self) -> None:
        """Copy into each layer's ``running_mean`` / ``running_var`` (layers with < 2 values are left as they are)."""
        for i, (layer, mean, var) in enumerate(zip(self.layers, self.means, self.variances, strict=True)):
            if i not in self.skipped:
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)


class BatchNormMomentRecorder:
    """Forward pre-hooks that record per-channel moments of the inputs of BN layers in training mode.

    Args:
        layers: BN layers to watch (:func:`batchnorm_layers`).
        window: keep only the last ``window`` batches of each layer (Akiba); None: pool every batch
            into running float64 totals (precise BN).
        ignore_paused: skip forward passes inside :func:`~lightning_lbo.capture.curvature_capture_paused`
            (auxiliary passes of other callbacks are not training batches).

    Hooks do no host sync: moments stay on the device; counts are Python ints read off shapes.

    Example::

        recorder = BatchNormMomentRecorder(batchnorm_layers(model), window=1).attach()
        model(x)                       # training mode: moments recorded
        recorder.statistics().install()
    """

    def __init__(self, layers: Sequence[_BatchNorm], window: int | None, ignore_paused: bool = True) -> None:
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"Invalid window: {window!r}; use a positive number of batches or None.")
        self.layers = list(layers)
        self.window = window
        self.ignore_paused = ignore_paused
        self._handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        # Window mode: per layer a deque of [n, mean, m2, rows, kept], ``kept`` a 0-d bool on the device that
        # discard_cycle_where() clears for the batches of a skipped (non-finite) step. Twice the window is kept
        # so that the last ``window`` kept batches are there after a few skipped ones; pooling picks them.
        # Total mode: [n, mean, m2, rows, batches].
        maxlen = None if self.window is None else 2 * self.window
        self._recent: list[deque] = [deque(maxlen=maxlen) for _ in self.layers]
        self._totals: list[list[Any]] = [[0, None, None, 0, 0] for _ in self.layers]
        # Window entries recorded since the last discard_cycle_where(); bounded by what the window can hold,
        # so that it stays small when no guard ever calls it.
        self._cycle: deque = deque(maxlen=None if maxlen is None else maxlen * len(self.layers))

    def attach(self) -> BatchNormMomentRecorder:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def detach(self) -> None:
        """Remove the hooks; recorded moments are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not module.training or (self.ignore_paused and capture_paused()):
                return
            x = args[0].detach()
            n, mean, m2 = batch_moments(x)
            if self.window is not None:
                entry = [n, mean, m2, x.shape[0], torch.ones((), dtype=torch.bool, device=mean.device)]
                self._recent[index].append(entry)
                self._cycle.append(entry)
            else:
                self._accumulate(index, n, mean, m2, x.shape[0])
        return hook

    def _accumulate(self, index: int, n: int, mean: Tensor, m2: Tensor, rows: int) -> None:
        total = self._totals[index]
        dtype = accumulation_dtype(mean.device)
        mean, m2 = mean.to(dtype), m2.to(dtype)
        if total[1] is None:
            total[:3] = [n, mean, m2]
        else:
            n_a, mean_a, m2_a = total[:3]
            n_ab = n_a + n
            delta = mean - mean_a
            total[:3] = [n_ab, mean_a + delta * (n / n_ab), m2_a + m2 + delta ** 2 * (n_a * n / n_ab)]
        total[3] += rows
        total[4] += 1

    def num_batches(self) -> int:
        """Batches recorded at the first layer on this rank (within the window, if any)."""
        if not self.layers:
            return 0
        return len(self._kept(0)) if self.window is not None else self._totals[0][4]

    def discard_cycle_where(self, bad: Tensor) -> None:
        """Forget, where ``bad`` (0-d bool on the device) is true, the batches recorded since the last call.

        :class:`~lightning_lbo.callbacks.NonFiniteBatchGuard` calls this at the end of every accumulation
        cycle, so that a skipped (non-finite) step leaves the window as if its batches had never been run.
        No host sync: the flags are read when the window is pooled.
        """
        for entry in self._cycle:
            entry[4] = entry[4] & ~bad.to(entry[4].device)
        self._cycle.clear()

    def _kept(self, index: int) -> list[list[Any]]:
        """The last ``window`` entries of layer ``index`` not discarded (reads their flags: one host sync)."""
        entries = list(self._recent[index])
        if entries:
            flags = torch.stack([e[4] for e in entries]).tolist()
            entries = [e for e, keep in zip(entries, flags, strict=True) if keep]
        return entries[-self.window:] if self.window is not None else entries

    def _local(self, index: int, device: torch.device, dtype: torch.dtype) -> tuple[float, Tensor, Tensor, int]:
        channels = self.layers[index].num_features
        entries = self._kept(index) if self.window is not None else []
        if entries:
            counts = torch.tensor([e[0] for e in entries], dtype=dtype, device=device)
            means = torch.stack([e[1].to(device, dtype) for e in entries])
            m2s = torch.stack([e[2].to(device, dtype) for e in entries])
            n, mean, m2 = pool_moments(counts, means, m2s)
            return float(n), mean, m2, sum(e[3] for e in entries)
        if self.window is None and self._totals[index][1] is not None:
            n, mean, m2, rows, _ = self._totals[index]
            return float(n), mean.to(device, dtype), m2.to(device, dtype), rows
        zeros = torch.zeros(channels, dtype=dtype, device=device)
        return 0.0, zeros, zeros.clone(), 0

    def statistics(self, reduce_sum: ReduceSum | None = None) -> BatchNormStatistics:
        """Pool what was recorded (over the window or all batches) and over ranks.

        Collective: with ``reduce_sum`` every rank must call this, recorded or not.
        """
        if not self.layers:
            raise ValueError("No BatchNorm layers with running statistics to pool.")
        device = self.layers[0].running_mean.device
        dtype = accumulation_dtype(device)
        local = [self._local(i, device, dtype) for i in range(len(self.layers))]
        counts = torch.tensor([entry[0] for entry in local], dtype=dtype, device=device)
        extra = torch.tensor([local[0][3], self.num_batches()], dtype=dtype, device=device)
        counts, means, m2s, extra = reduce_moments(counts, [e[1] for e in local], [e[2] for e in local], extra,
                                                   reduce_sum)
        rows, batches = (int(v) for v in extra.tolist())
        return BatchNormStatistics.from_moments(self.layers, counts, means, m2s, rows, batches)

    def state_dict(self) -> dict[str, Any]:
        """Recorded moments (window mode) as CPU tensors."""
        return {"window": self.window,
                "recent": [[(n, mean.cpu(), m2.cpu(), rows) for n, mean, m2, rows, _ in self._kept(i)]
                           for i in range(len(self.layers))]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore moments saved by :meth:`state_dict` (ignored if the layer count differs)."""
        recent = state.get("recent", [])
        if len(recent) != len(self.layers):
            return
        for d, entries in zip(self._recent, recent, strict=True):
            d.clear()
            d.extend([n, mean, m2, rows, torch.ones((), dtype=torch.bool, device=mean.device)]
                     for n, mean, m2, rows in entries)


def estimate_precise_stats(module: nn.Module, batches: Iterable[Any], num_batches: int,
                           forward: Callable[[Any], Any], reduce_sum: ReduceSum | None = None,
                           forward_context: Callable[[], Any] | None = None) -> BatchNormStatistics:
    """Population statistics of every BN layer's input over up to ``num_batches`` batches (precise BN).

    The model runs in eval mode except its BN layers, which run in training mode (they normalise with
    batch statistics, as in training) with ``momentum=0``; nothing is recorded by curvature hooks
    (:func:`~lightning_lbo.capture.curvature_capture_paused`) and no gradient is taken. Every module's
    training flag and every BN layer's momentum, running statistics and ``num_batches_tracked`` are
    restored afterwards; the result is *not* installed (call :meth:`BatchNormStatistics.install`).

    Args:
        module: the (unwrapped) model.
        batches: iterable of batches, already on the model's device or moved by ``forward``.
        num_batches: batches to use at most (fewer if ``batches`` runs out; see ``num_batches`` of the result).
        forward: runs the model on one batch.
        reduce_sum: sums over ranks (collective); with it, ranks also agree batch by batch to stop
            when any rank runs out, so layers that synchronise in forward (SyncBatchNorm) never hang.
        forward_context: a context manager factory around each forward (autocast of the precision).

    Example::

        stats = estimate_precise_stats(model, loader, 50, forward=lambda b: model(b[0]))
        stats.install()
    """
    positive_int("num_batches", num_batches)
    layers = batchnorm_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no BatchNorm layers with running statistics.")
    modes = {m: m.training for m in module.modules()}
    saved = [(layer.momentum, layer.running_mean.clone(), layer.running_var.clone(),
              None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone()) for layer in layers]
    recorder = BatchNormMomentRecorder(layers, window=None, ignore_paused=False)
    device = layers[0].running_mean.device
    try:
        module.eval()
        for layer in layers:
            layer.train()
            layer.momentum = 0.0
        recorder.attach()
        iterator = iter(batches)
        with torch.no_grad(), curvature_capture_paused():
            for _ in range(num_batches):
                batch = next(iterator, _END)
                if reduce_sum is not None:
                    missing = torch.tensor([float(batch is _END)], device=device)
                    if reduce_sum(missing).item() > 0:
                        break
                elif batch is _END:
                    break
                if forward_context is None:
                    forward(batch)
                else:
                    with forward_context():
                        forward(batch)
    finally:
        recorder.detach()
        with torch.no_grad():
            for layer, (momentum, mean, var, tracked) in zip(layers, saved, strict=True):
                layer.momentum = momentum
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                if tracked is not None:
                    layer.num_batches_tracked.copy_(tracked)
        for m, training in modes.items():
            m.training = training
    return recorder.statistics(reduce_sum)


_END = object()


# ------------------------------------------------------------------------------------------- ghost BN


def ghost_chunk_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the virtual batches a ghost BN layer splits ``batch`` rows into.

    ``batch // g`` chunks of ``g`` rows, then the remainder ``batch % g`` as a smaller last chunk,
    except a remainder of one row, which joins the chunk before it (a chunk of one example would be
    normalised by its own values alone: a zero output without spatial dims). A batch of at most ``g``
    rows is one chunk: plain batch norm.
    """
    positive_int("virtual_batch_size", virtual_batch_size)
    if batch <= virtual_batch_size:
        return [batch]
    sizes = [virtual_batch_size] * (batch // virtual_batch_size)
    rest = batch % virtual_batch_size
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


class _GhostBatchNorm:
    """Forward of ghost batch norm (Hoffer, Hubara, Soudry 2017), mixed into ``nn.BatchNorm1d/2d/3d``.

    In training mode (and in eval mode without running statistics, as torch's BN) the batch is split
    into virtual batches of ``virtual_batch_size`` rows (:func:`ghost_chunk_sizes`) and each is
    normalised by its own statistics: exactly ``F.batch_norm`` called on each chunk in turn. The
    running statistics are updated once per chunk, in order, with the layer's ``momentum`` (or the
    cumulative average when ``momentum=None``), so ``num_batches_tracked`` counts virtual batches.
    In eval mode the running statistics normalise the whole batch, as in plain BN. Nothing is
    synchronised across ranks: the chunks are per device.
    """

    virtual_batch_size: int

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - documented on the class
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return super().forward(x)
        chunks = x.split(ghost_chunk_sizes(x.shape[0], self.virtual_batch_size)) if x.shape[0] else (x,)
        return torch.cat([self._normalize_chunk(chunk) for chunk in chunks])

    def _normalize_chunk(self, chunk: Tensor) -> Tensor:
        # the momentum logic of torch's _BatchNorm.forward, once per virtual batch
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        return F.batch_norm(chunk, self.running_mean if update else None, self.running_var if update else None,
                            self.weight, self.bias, True, factor, self.eps)

    def normalized_input(self, x: Tensor) -> Tensor:
        """``x_hat``: ``x`` normalised as this layer's forward does, without the affine map, updating nothing.

        In training mode each virtual batch by its own statistics; in eval mode by the running
        statistics. The hook for a curvature block (K-FAC's unit-wise BN block) whose statistic must see
        the ghost-normalised input: ``F.batch_norm`` on the whole batch would use other statistics.
        """
        if not (self.training or self.running_mean is None):
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        chunks = x.split(ghost_chunk_sizes(x.shape[0], self.virtual_batch_size)) if x.shape[0] else (x,)
        return torch.cat([F.batch_norm(c, None, None, None, None, True, 0.0, self.eps) for c in chunks])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with statistics over virtual batches of ``virtual_batch_size`` rows in training.

    Same arguments as ``nn.BatchNorm1d`` after ``num_features`` and ``virtual_batch_size``; same
    parameters, buffers and ``state_dict`` keys, so a plain BN checkpoint loads (and vice versa).
    See :class:`_GhostBatchNorm` for the forward, :meth:`normalized_input` for the curvature hook.

    Example::

        bn = GhostBatchNorm1d(256, virtual_batch_size=32)
        y = bn(torch.randn(2048, 256))   # 64 virtual batches, each normalised by its own statistics
    """

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs: Any) -> None:
        positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ghost statistics in training (see :class:`GhostBatchNorm1d`)."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs: Any) -> None:
        positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with ghost statistics in training (see :class:`GhostBatchNorm1d`)."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs: Any) -> None:
        positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size


_GHOST_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d,
}


def convert_to_ghost_batchnorm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` of ``module`` by its ghost version, in place; returns ``module``.

    Parameters, running statistics, ``num_batches_tracked``, ``momentum``, ``eps``, ``affine``,
    ``track_running_stats``, the training flag, device and dtype are kept (the new layer takes the old
    layer's tensors), and so are the parameter objects: an optimizer built before the conversion still
    steps them. Ghost layers already there get the new ``virtual_batch_size``. Convert before wrapping
    the model in DDP and before building an optimizer that registers module hooks (K-FAC).

    Raises:
        ValueError: ``module`` holds a ``SyncBatchNorm`` (statistics across ranks; ghost BN keeps them
            within each device): convert the model without ``SyncBatchNorm.convert_sync_batchnorm``.
    """
    positive_int("virtual_batch_size", virtual_batch_size)
    if isinstance(module, _GhostBatchNorm):
        module.virtual_batch_size = virtual_batch_size
        return module
    if isinstance(module, nn.SyncBatchNorm):
        raise ValueError("convert_to_ghost_batchnorm: the model has SyncBatchNorm layers, which pool statistics "
                         "across ranks; ghost batch norm keeps them within each device. Convert the model without "
                         "SyncBatchNorm.convert_sync_batchnorm (or before it is applied).")
    for name, child in list(module.named_children()):
        ghost_type = _GHOST_OF.get(type(child))
        if ghost_type is None:
            convert_to_ghost_batchnorm(child, virtual_batch_size)
            continue
        ghost = ghost_type.__new__(ghost_type)
        ghost.__dict__.update(child.__dict__)  # the same parameters, buffers, hooks and flags
        ghost.virtual_batch_size = virtual_batch_size
        setattr(module, name, ghost)
    return module
