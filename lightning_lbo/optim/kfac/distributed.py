"""K-FAC curvature sync over ``torch.distributed``: the communicator installed under DDP.

Data-parallel K-FAC (Osawa et al. 2019, arXiv 1811.12019; Pauloski et al. "KAISA", SC'21) lets every
rank estimate Kronecker factors on its own micro-batch and *averages* them, exactly as DDP averages
gradients: with ``N`` ranks of batch ``B/N`` the averaged factors equal the factors of one process
with batch ``B`` (for per-example-mean factors). This module implements the four collectives of
:class:`~lightning_lbo.optim.kfac.comm.Communicator` with ``torch.distributed``:

* :meth:`TorchDistributedCommunicator.reduce_factors` copies factors into flat buckets of
  ``bucket_cap_mb`` and launches one ``all_reduce`` per full bucket, asynchronously (``async_op=True``)
  or blocking (the plain-``ddp`` correctness path). A symmetric ``n x n`` factor (or a batch ``[..., n, n]``,
  like the unit-wise 2x2 BatchNorm blocks) travels as packed upper triangles, ``n (n + 1) / 2`` numbers
  per matrix instead of ``n^2`` (``torch.triu_indices``); it is unpacked
  into both triangles and divided by the world size in :meth:`~TorchDistributedCommunicator.wait`.
* :meth:`~TorchDistributedCommunicator.assign` is :func:`greedy_assignment`: static greedy
  longest-processing-time scheduling of inverse work on its cost (``n^3``); pure, so every rank
  computes the same owners without talking.
* :meth:`~TorchDistributedCommunicator.broadcast` moves inverses (grad-worker fraction 1) or
  preconditioned gradients (fraction ``1/world``) from their owner to every rank, one flat buffer
  per call.
* :meth:`~TorchDistributedCommunicator.all_min` is the collective decision (logical AND of flags).

Every collective is counted in :attr:`TorchDistributedCommunicator.stats` (payload bytes per rank),
which ``benchmarks/kfac_comm.py`` reads. No Lightning import, and the K-FAC core never imports this
module at import time: the Lightning layer (:mod:`lightning_lbo.callbacks.kfac_lifecycle`) builds the
communicator and injects it (:func:`default_communicator`, the synchronous one, under plain
``strategy="ddp"``); outside Lightning the user injects one with ``pre.set_communicator(...)``.

Example::

    dist.init_process_group("gloo")
    comm = TorchDistributedCommunicator(bucket_cap_mb=25, async_op=True)
    comm.reduce_factors([A1, A2], symmetric=True)   # returns at once
    ...                                              # backward runs meanwhile
    comm.wait()                                      # A1, A2 now hold the averages over ranks
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_lbo.optim.kfac.comm import Communicator


def greedy_assignment(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each work item by greedy longest-processing-time (LPT) scheduling.

    Items are taken in decreasing cost (ties: lower index first) and each goes to the rank with the
    least load so far (ties: lower rank). LPT is within 4/3 of the optimal makespan (Graham 1969).
    The function is pure: ranks that pass the same costs get the same owners.

    Args:
        costs: non-negative cost of each item (e.g. ``n^3`` of a factor's inverse).
        world_size: number of ranks.

    Example::

        >>> greedy_assignment([8.0, 1.0, 4.0, 4.0], world_size=2)
        [0, 0, 1, 1]
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; need at least 1 rank.")
    costs = [float(c) for c in costs]
    bad = [c for c in costs if not math.isfinite(c) or c < 0]
    if bad:
        raise ValueError(f"Invalid costs {bad}: each cost must be finite and non-negative.")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[item] = rank
        loads[rank] += costs[item]
    return owners


_TRIANGLES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def triangle_indices(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear indices ``(upper, lower)`` of the upper triangle of an ``n x n`` matrix and its mirror.

    ``matrix.view(-1)[upper]`` is the packed upper triangle (row-major, diagonal included) and
    ``lower`` holds the transposed positions, so writing the packed values at both restores a
    symmetric matrix. Cached per size and device.
    """
    key = (n, torch.device(device))
    if key not in _TRIANGLES:
        rows, cols = torch.triu_indices(n, n, device=device)
        _TRIANGLES[key] = (rows * n + cols, cols * n + rows)
    return _TRIANGLES[key]


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """Packed upper triangles, flat, of (a batch of) square matrices ``[..., n, n]`` (a new tensor)."""
    n = matrix.shape[-1]
    upper, _ = triangle_indices(n, matrix.device)
    return matrix.reshape(-1, n * n).index_select(1, upper).reshape(-1)


def unpack_symmetric_(matrix: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Write packed upper triangles into both triangles of ``matrix`` ``[..., n, n]`` in place."""
    n = matrix.shape[-1]
    upper, lower = triangle_indices(n, matrix.device)
    flat = matrix.view(-1, n * n)
    rows = packed.view(flat.shape[0], -1)
    flat.index_copy_(1, upper, rows)
    flat.index_copy_(1, lower, rows)
    return matrix


def _packed_numel(t: torch.Tensor) -> int:
    n = t.shape[-1]
    return t.numel() // (n * n) * (n * (n + 1) // 2)


def _is_square(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.numel() > 0


@dataclass
class CommStats:
    """Payload bytes of curvature traffic per rank (the message size each collective carries).

    A ring all-reduce moves about ``2 (N - 1) / N`` times its payload over each rank's link; the
    payload is what packing and staleness reduce, so it is what is counted.
    """

    factor_bytes: int = 0  #: bytes all-reduced for factors (packed when symmetric)
    factor_dense_bytes: int = 0  #: bytes the same reductions would carry as full matrices
    factor_reductions: int = 0  #: all_reduce calls (buckets) for factors
    broadcast_bytes: int = 0  #: bytes of inverses / preconditioned gradients broadcast (packed when symmetric)
    broadcast_dense_bytes: int = 0  #: bytes the same broadcasts would carry as full tensors
    decision_bytes: int = 0  #: bytes of all_min decisions
    #: bytes of whole gradients (and parameters, with folded L2) all-gathered for sharded parameters (payload: the
    #: whole tensor; see :mod:`~lightning_lbo.optim.kfac.placement`)
    shard_gather_bytes: int = 0
    #: bytes of preconditioned rows scattered back from a block's owner (``shard_placement="owner"``; payload: the
    #: whole, padded tensor)
    shard_scatter_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.factor_bytes + self.broadcast_bytes + self.decision_bytes + self.shard_gather_bytes
                + self.shard_scatter_bytes)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total_bytes": self.total_bytes}


class _Bucket:
    """Factors waiting to be sent together: destinations, whether packed, and their payloads."""

    def __init__(self) -> None:
        self.targets: list[tuple[torch.Tensor, bool]] = []
        self.payloads: list[torch.Tensor] = []
        self.nbytes = 0


def check_grad_worker_fraction(fraction: float, world_size: int | None = None) -> int | None:
    """The one rule for ``grad_worker_fraction``; returns the number of ranks that precondition each layer.

    Valid: ``1.0`` (every rank preconditions every layer) or ``1 / world_size`` (each layer's owner
    preconditions it and broadcasts the result), the two ends of KAISA's range that the communicator
    implements. Without ``world_size`` (a strategy's constructor, before the world is known) the value
    must already be ``1 / k`` for a whole ``k``; with it, ``k`` must be ``1`` or ``world_size``. Anything
    else (``0.3``; ``0.5`` on 4 ranks) raises a ValueError naming the valid values, never rounds.

    Returns ``None`` without ``world_size``.
    """
    size = "" if world_size is None else f" with world size {world_size}"
    end = "" if world_size is None else f" = {1 / world_size:g}"
    ok = (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
          and 0.0 < fraction <= 1.0)
    whole = round(1.0 / fraction) if ok else 0
    ok = ok and math.isclose(whole * fraction, 1.0, rel_tol=1e-9)
    if ok and world_size is not None:
        ok = whole in (1, world_size)
    if not ok:
        raise ValueError(f"Invalid grad_worker_fraction: {fraction!r}{size}; use 1.0 (every rank preconditions "
                         f"each layer) or 1/world_size{end} (each layer's owner preconditions it).")
    return None if world_size is None else world_size // whole


class TorchDistributedCommunicator(Communicator):
    """:class:`Communicator` over a ``torch.distributed`` process group.

    Args:
        group: process group of the ranks that share curvature (default: the world). The strategy
            passes a dedicated group so factor traffic never interleaves with DDP's gradient buckets.
        bucket_cap_mb: a bucket is sent once it holds at least this many MiB (like DDP's
            ``bucket_cap_mb``); ``0`` sends each factor on its own.
        async_op: launch reductions without blocking (completed in :meth:`wait`); ``False`` reduces
            synchronously inside :meth:`reduce_factors` (used under plain ``strategy="ddp"``).
        pack_symmetric: send symmetric factors as packed upper triangles.
        grad_worker_fraction: fraction of ranks that precondition each layer (KAISA). ``1.0``: the
            owner broadcasts inverses and every rank preconditions; ``1 / world_size``: the owner
            preconditions its layers and broadcasts the result. Read by the K-FAC preconditioner.
        reduce_dtype: ``None`` (default): factors are all-reduced in their own dtype.
            ``torch.bfloat16`` (or ``float16``): each rank sends its factors rounded to 16 bits (half
            the bytes) with an all-gather, and every rank sums them in the factor dtype in rank order
            (fp32 accumulation, identical on every rank). Cheaper than an fp32 all-reduce up to ~4
            ranks per curvature group; relative rounding ``2^-9`` per factor entry.
        reduce_in_hooks: K-FAC reduces each statistic from its capture hooks (overlapping the
            backward; every rank must run the same layers the same number of times, which is checked
            on each refresh step: a mismatch raises naming the layer) instead of at step time, in
            block order, after the ranks agree which blocks captured (correct under rank-dependent
            control flow: a statistic missing on any rank is skipped on every rank). ``None``
            (default): ``async_op``. ``strategy="ddp_kfac"`` passes ``False`` with
            ``find_unused_parameters=True``.

    Example::

        comm = TorchDistributedCommunicator(group=dist.new_group(), grad_worker_fraction=1.0)
        kfac.set_communicator(comm)
    """

    def __init__(self, group: Any = None, bucket_cap_mb: float = 25.0, async_op: bool = True,
                 pack_symmetric: bool = True, grad_worker_fraction: float = 1.0,
                 reduce_dtype: torch.dtype | None = None, reduce_in_hooks: bool | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedCommunicator needs an initialized process group: "
                               "call torch.distributed.init_process_group first (Lightning's DDP strategies do).")
        if not bucket_cap_mb >= 0 or not math.isfinite(bucket_cap_mb):
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb}; use a finite size >= 0 (MiB).")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        grad_workers = check_grad_worker_fraction(grad_worker_fraction, self.world_size)
        self.grad_worker_fraction = grad_workers / self.world_size
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.async_op = async_op
        # hook-time reductions only pay off when they overlap the backward (async)
        self.reduce_in_hooks = async_op if reduce_in_hooks is None else bool(reduce_in_hooks)
        self.pack_symmetric = pack_symmetric
        if reduce_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"Invalid reduce_dtype: {reduce_dtype}; use None (the factors' dtype), "
                             "torch.bfloat16 or torch.float16.")
        self.reduce_dtype = reduce_dtype
        self.stats = CommStats()
        self._pending: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        self._in_flight: list[tuple[Any, torch.Tensor, list[tuple[torch.Tensor, bool]], Any]] = []

    @property
    def owners_precondition(self) -> bool:
        """True when each layer's owner preconditions its gradient and broadcasts the result."""
        return self.world_size > 1 and self.grad_worker_fraction < 1.0

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ---- factor averaging -------------------------------------------------------------------------------
    def reduce_factors(self, factors: Sequence[torch.Tensor], symmetric: bool = True) -> None:
        """Queue ``factors`` for averaging; full buckets are launched now (async) or reduced now (sync)."""
        if self.world_size == 1:
            return
        for factor in factors:
            packed = symmetric and self.pack_symmetric and _is_square(factor)
            payload = pack_symmetric(factor) if packed else factor.reshape(-1)
            bucket = self._pending.setdefault((factor.dtype, factor.device), _Bucket())
            bucket.targets.append((factor, packed))
            bucket.payloads.append(payload)
            bucket.nbytes += payload.numel() * payload.element_size()
            self.stats.factor_dense_bytes += factor.numel() * factor.element_size()
            if bucket.nbytes >= self.bucket_cap_bytes:
                self._launch(self._pending.pop((factor.dtype, factor.device)))
        if not self.async_op:
            self.wait()

    def flush(self) -> None:
        """Launch every partly filled bucket now (e.g. right after the forward, to overlap the backward)."""
        for key in list(self._pending):
            self._launch(self._pending.pop(key))

    def _launch(self, bucket: _Bucket) -> None:
        buffer = torch.cat(bucket.payloads) if len(bucket.payloads) > 1 else bucket.payloads[0].clone()
        self.stats.factor_reductions += 1
        if self.reduce_dtype is None or self.reduce_dtype == buffer.dtype:
            self.stats.factor_bytes += bucket.nbytes
            work = dist.all_reduce(buffer, group=self.group, async_op=self.async_op)
            self._in_flight.append((work, buffer, bucket.targets, None))
            return
        # Low precision on the wire, fp32 accumulation: gather every rank's rounded payload (as raw
        # bytes: gloo moves no bf16) and sum them in the factor dtype, in rank order.
        low = buffer.to(self.reduce_dtype)
        words = low.view(torch.uint8)
        gathered = [torch.empty_like(words) for _ in range(self.world_size)]
        self.stats.factor_bytes += low.numel() * low.element_size()
        work = dist.all_gather(gathered, words, group=self.group, async_op=self.async_op)
        self._in_flight.append((work, buffer, bucket.targets, gathered))

    def wait(self) -> None:
        """Send what is still queued, wait for every reduction, write the averages into the factors."""
        self.flush()
        in_flight, self._in_flight = self._in_flight, []
        for work, buffer, targets, gathered in in_flight:
            if work is not None:
                work.wait()
            if gathered is not None:
                buffer.zero_()
                for words in gathered:
                    buffer.add_(words.view(self.reduce_dtype).to(buffer.dtype))
            buffer.div_(self.world_size)
            offset = 0
            for factor, packed in targets:
                numel = _packed_numel(factor) if packed else factor.numel()
                chunk = buffer[offset:offset + numel]
                offset += numel
                if packed:
                    unpack_symmetric_(factor, chunk)
                else:
                    factor.copy_(chunk.view_as(factor))

    # ---- work assignment, broadcast, decisions -----------------------------------------------------------
    def assign(self, costs: Sequence[float]) -> list[int]:
        """Owners by :func:`greedy_assignment` (pure: identical on every rank for identical costs)."""
        return greedy_assignment(costs, self.world_size)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int, symmetric: Sequence[bool] | None = None) -> None:
        """Overwrite ``tensors`` with rank ``src``'s values; tensors of one dtype/device travel as one buffer.

        Tensors flagged in ``symmetric`` (batches of symmetric matrices, e.g. Cholesky inverses) travel
        as packed upper triangles (with ``pack_symmetric``) and are written back into both triangles on
        every rank, the source included, so all ranks hold the same bits.
        """
        if self.world_size == 1 or not tensors:
            return
        if not 0 <= src < self.world_size:
            raise ValueError(f"Invalid src: {src}; ranks are 0..{self.world_size - 1}.")
        flags = list(symmetric) if symmetric is not None else [False] * len(tensors)
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[torch.Tensor, bool]]] = {}
        for t, sym in zip(tensors, flags, strict=True):
            groups.setdefault((t.dtype, t.device), []).append((t, sym and self.pack_symmetric and _is_square(t)))
        for same in groups.values():
            parts = [pack_symmetric(t) if packed else t.reshape(-1) for t, packed in same]
            buffer = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            self.stats.broadcast_bytes += buffer.numel() * buffer.element_size()
            self.stats.broadcast_dense_bytes += sum(t.numel() * t.element_size() for t, _ in same)
            dist.broadcast(buffer, src=self._global_rank(src), group=self.group)
            offset = 0
            for (t, packed), part in zip(same, parts, strict=True):
                chunk = buffer[offset:offset + part.numel()]
                offset += part.numel()
                if packed:
                    unpack_symmetric_(t, chunk)
                else:
                    t.copy_(chunk.view_as(t))

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over ranks, in place (bool flags become their logical AND)."""
        if self.world_size == 1:
            return tensor
        work = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        self.stats.decision_bytes += work.numel() * work.element_size()
        dist.all_reduce(work, op=dist.ReduceOp.MIN, group=self.group)
        if work is not tensor:
            tensor.copy_(work.bool())
        return tensor


# ---- cross-rank checks and the plain-DDP fallback; no Lightning import --------------------------------------
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip(".")))
    return out


def verify_same_signature(signature: Any, group: Any = None) -> None:
    """Gather ``signature`` (a picklable description of K-FAC's layers and settings) from every rank.

    Raises on every rank if any rank differs from rank 0, naming the rank and the differing keys:
    a rank with other layers or intervals would otherwise wait forever in a later collective.
    No-op without an initialized process group.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, signature, group=group)
    reference = _flatten(gathered[0])
    problems = []
    for rank, other in enumerate(gathered[1:], start=1):
        theirs = _flatten(other)
        for key in sorted(set(reference) | set(theirs)):
            mine, their = reference.get(key, "<missing>"), theirs.get(key, "<missing>")
            if mine != their:
                problems.append(f"rank {rank} has {key} = {their!r} where rank 0 has {mine!r}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise RuntimeError(f"K-FAC is configured differently across ranks: {shown}. Every rank must build the "
                           "same model, the same K-FAC layers (exclusions) and the same hyperparameters.")


_HINT_SHOWN = False


def default_communicator(timeout: timedelta | None = None) -> Communicator:
    """The synchronous communicator: what ``KFACCallback`` injects under plain ``strategy="ddp"``, and what
    a user outside Lightning injects (``pre.set_communicator(default_communicator())``).

    Lightning's DDP averages gradients but knows nothing about Kronecker factors, so without this
    every rank would precondition with its own factors: a synchronous communicator on a new process
    group (a collective: every rank calls it at the same point). One-process runs
    get the no-op :class:`Communicator`. A one-time hint recommends ``strategy="ddp_kfac"``, which
    overlaps and packs the reductions and shares the inverse work.

    Args:
        timeout: how long a curvature collective of the new group waits for a peer before it fails (give
            the strategy's DDP timeout; ``KFACCallback`` does); ``None``: torch's default process-group timeout.
    """
    global _HINT_SHOWN
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return Communicator()
    comm = TorchDistributedCommunicator(group=dist.new_group(backend=dist.get_backend(), timeout=timeout),
                                        async_op=False)
    if not _HINT_SHOWN and comm.rank == 0:
        _HINT_SHOWN = True
        warnings.warn("K-FAC under plain DDP: Kronecker factors are now averaged across ranks synchronously. "
                      "strategy='ddp_kfac' overlaps these reductions with the backward, sends packed triangles "
                      "and shares the inverse work between ranks.", UserWarning, stacklevel=2)
    return comm
