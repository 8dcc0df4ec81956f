"""A distributed-aware batch sampler whose batch size can change between epochs, with exact resume.

Every epoch draws one permutation of the dataset (``torch.randperm`` seeded by ``seed + epoch``, the
same on every rank) and walks it with a *global* cursor: a step takes the next
``batch_size x num_replicas`` indices and rank ``r`` keeps the ``r``-th block of ``batch_size``.
So within an epoch every index is used exactly once over all ranks, whatever batch sizes the steps
had; a rank never sees a shard of its own (a resize moves the cut between ranks, not the data).

The last step of an epoch may be short. With ``drop_last=False`` its ``n`` remaining indices are
split into ``num_replicas`` nearly equal blocks (sizes differ by at most one); if ``n < num_replicas``,
the ranks past ``n`` reuse an index of that step (the only repetition, at most ``num_replicas - 1``
samples, as ``DistributedSampler`` pads). With ``drop_last=True`` the short step is dropped.

Resizing (:meth:`set_batch_size`) applies to batches drawn after the call; the resize mechanism of
:class:`~lightning_lbo.callbacks.AdaptiveBatchSize` calls it between epochs. Resume: the sampler
records every batch it yields (start cursor and size) and the training loop reports how many were
consumed (:meth:`mark_consumed`; Lightning prefetches ahead); :meth:`state_dict` stores the cursor of
the first unconsumed batch and the sizes of the batches drawn but not trained on, so a resumed epoch
replays exactly the batches the interrupted one would have trained on. :class:`ResizableDataLoader`
exposes that state to Lightning, which saves and restores stateful loaders with the fit loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_lbo._checks import positive_int


class ResizableBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices per rank from one shared permutation per epoch; resizable.

    Args:
        num_samples: dataset length.
        batch_size: per-device batch size to start with.
        shuffle: a new permutation per epoch (``seed + epoch``); otherwise ``0..N-1`` in order.
        seed: seed of the permutations (must be the same on every rank).
        drop_last: drop an epoch's last, short step instead of splitting it.
        num_replicas, rank: the data-parallel group; default: ``torch.distributed`` when initialised
            (read at every ``__iter__``/``__len__``), else one process.

    Example::

        sampler = ResizableBatchSampler(len(train_set), batch_size=128, seed=0)
        loader = ResizableDataLoader(train_set, sampler)
        sampler.set_batch_size(256)  # from the next epoch
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_samples = positive_int("num_samples", num_samples)
        self.batch_size = positive_int("batch_size", batch_size)
        if num_replicas is not None:
            positive_int("num_replicas", num_replicas)
        if rank is not None and not (isinstance(rank, int) and 0 <= rank < (num_replicas or 1)):
            raise ValueError(f"Invalid rank: {rank!r}; use 0 <= rank < num_replicas ({num_replicas}).")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self._start = 0  # global cursor the current epoch's iteration starts at (non-zero after a resume)
        self._batches_before_start = 0  # steps of this epoch taken before ``_start`` (so __len__ counts the epoch)
        self._replay: list[int] = []  # per-device sizes of batches to draw first (drawn but untrained at save)
        self._yielded: list[tuple[int, int]] = []  # (start cursor, per-device size) of each batch this iteration
        self._consumed: int | None = None

    # ------------------------------------------------------------------ group
    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def sampler(self) -> ResizableBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``."""
        return self

    # ------------------------------------------------------------------ control
    def set_batch_size(self, batch_size: int) -> None:
        """Per-device batch size of the batches drawn from now on."""
        self.batch_size = positive_int("batch_size", batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (Lightning calls this before each epoch); a restored epoch keeps its cursor."""
        if epoch != self.epoch:
            self.epoch, self._start, self._batches_before_start, self._replay = epoch, 0, 0, []

    def mark_consumed(self) -> None:
        """The training loop has trained on one more batch of this iteration (called once per batch)."""
        self._consumed = (self._consumed or 0) + 1

    def permutation(self) -> torch.Tensor:
        """This epoch's order of all indices (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    # ------------------------------------------------------------------ iteration
    def _step_sizes(self, start: int) -> Iterator[int]:
        """Per-device sizes of the steps from cursor ``start`` to the epoch's end (replayed sizes first)."""
        cursor, world = start, self.num_replicas
        for i in range(len(self._replay) + self.num_samples):
            size = self._replay[i] if i < len(self._replay) else self.batch_size
            remaining = self.num_samples - cursor
            if remaining <= 0 or (self.drop_last and remaining < size * world):
                return
            yield size
            cursor += min(size * world, remaining)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation().tolist()
        world, rank = self.num_replicas, self.rank
        self._yielded, self._consumed = [], None
        cursor = self._start
        for size in self._step_sizes(self._start):
            step = order[cursor: cursor + size * world]
            self._yielded.append((cursor, size))
            if len(step) == size * world:
                yield step[rank * size: (rank + 1) * size]
            else:  # the short last step: nearly equal blocks, ranks past the end reuse an index of the step
                bounds = [len(step) * r // world for r in range(world + 1)]
                block = step[bounds[rank]: bounds[rank + 1]]
                yield block or [step[rank % len(step)]]
            cursor += len(step)

    def __len__(self) -> int:
        """Steps of the current epoch: those before a resume cursor plus the rest at the current batch size."""
        return self._batches_before_start + sum(1 for _ in self._step_sizes(self._start))

    def epoch_length(self, batch_size: int | None = None) -> int:
        """Steps of a whole epoch at a constant per-device ``batch_size`` (default: the current one)."""
        chunk = (batch_size or self.batch_size) * self.num_replicas
        return self.num_samples // chunk if self.drop_last else math.ceil(self.num_samples / chunk)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Epoch, cursor of the first untrained batch, sizes of drawn-but-untrained batches, batch size."""
        consumed = len(self._yielded) if self._consumed is None else self._consumed
        pending = self._yielded[consumed:]
        if pending:
            start = pending[0][0]
        elif self._yielded:
            last_start, last_size = self._yielded[-1]
            start = min(self.num_samples, last_start + last_size * self.num_replicas)
        else:
            start = self._start
        return {"epoch": self.epoch, "start": start, "replay": [size for _, size in pending],
                "batches_before_start": self._batches_before_start + consumed,
                "batch_size": self.batch_size, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(f"The checkpoint's sampler covered {state['num_samples']} samples, this one "
                             f"{self.num_samples}: resume with the same training set.")
        self.epoch = int(state.get("epoch", 0))
        self._start = int(state.get("start", 0))
        self._batches_before_start = int(state.get("batches_before_start", 0))
        self._replay = list(state.get("replay", []))
        self.batch_size = int(state.get("batch_size", self.batch_size))
        self._yielded, self._consumed = [], None
        if not any(True for _ in self._step_sizes(self._start)):  # saved at the epoch's end: the next one starts
            self.set_epoch(self.epoch + 1)


class ResizableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResizableBatchSampler`, stateful for Lightning's checkpoints.

    Lightning saves ``state_dict()`` of stateful train loaders with the fit loop and restores it on
    resume before the epoch's length is read, so a resumed run continues at the batch size and cursor
    it stopped at. Keyword arguments go to ``DataLoader`` (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, batch_sampler: ResizableBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, ResizableBatchSampler):
            raise TypeError(f"batch_sampler must be a ResizableBatchSampler, got {type(batch_sampler).__name__}.")
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
