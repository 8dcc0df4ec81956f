"""How a larger batch is applied: the two mechanisms of :class:`~lightning_lbo.callbacks.AdaptiveBatchSize`.

* :class:`Accumulation`: ``trainer.accumulate_grad_batches = factor`` (as Lightning's
  ``GradientAccumulationScheduler`` does between epochs). Every forward pass, and batch norm, still
  sees the base batch; a larger batch costs more serial micro-steps.
* :class:`Resize`: the per-device batch itself becomes ``factor x`` the base, through the train
  loader's :class:`~lightning_lbo.batch_sampler.ResizableBatchSampler`. On many devices a larger
  batch is then more parallel work per step, not more steps; batch norm sees the larger batch.

Accumulation applies a factor at an epoch's start or at an optimizer step after which the epoch's
batch count is a multiple of the new factor (:meth:`Accumulation.aligned`): Lightning counts its
accumulation windows from the epoch's first batch (it steps when ``batches % accumulate_grad_batches
== 0`` and zeroes the gradients when ``batch_idx % accumulate_grad_batches == 0``), so a factor
changed anywhere else would give a window the wrong length, its loss normalisation (``1 /
accumulate_grad_batches``) the wrong count, or skip a ``zero_grad``. Resize applies one between any
two optimizer steps (``AdaptiveBatchSize(decide_every_n_steps=...)``): the sampler's cursor still
covers each example once per epoch, and the epoch simply ends when the permutation is used up, in
fewer steps than Lightning read from the loader's length at the epoch's start (so a
``val_check_interval`` counted in batches may not land on the epoch's last batch).
"""

from __future__ import annotations

from typing import Any

from lightning_lbo.batch_sampler import ResizableBatchSampler
from lightning_lbo.compat import uses_distributed_sampler


class Accumulation:
    """Grow by gradient accumulation: the per-device batch stays the loader's."""

    name = "accumulate"

    def setup(self, trainer: Any) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"AdaptiveBatchSize sets accumulate_grad_batches itself, but the Trainer was given "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches}: remove it (the base batch is "
                             "the DataLoader's batch size).")
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise RuntimeError("DeepSpeed fixes gradient accumulation at initialisation; use "
                               "AdaptiveBatchSize(mechanism='resize') or another strategy.")

    @staticmethod
    def aligned(batches_done: int, factor: int) -> bool:
        """Whether ``factor`` may apply after the epoch's first ``batches_done`` batches (an optimizer step)."""
        return batches_done % factor == 0

    def apply(self, trainer: Any, factor: int) -> int | None:
        """Set the factor; returns the new per-device batch when it changes (never, here)."""
        trainer.accumulate_grad_batches = factor
        return None

    def on_batch_end(self, trainer: Any) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if isinstance(sampler, ResizableBatchSampler):  # a resumable loader: a mid-epoch checkpoint resumes exactly
            sampler.mark_consumed()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Resize:
    """Grow the per-device batch through the train loader's :class:`ResizableBatchSampler`.

    Requirements (checked in ``setup``/``on_train_start``, with the fix in the message): the train
    DataLoader's ``batch_sampler`` is a ``ResizableBatchSampler`` (a
    :class:`~lightning_lbo.batch_sampler.ResizableDataLoader` keeps its state in checkpoints);
    ``Trainer(reload_dataloaders_every_n_epochs=1)`` so Lightning re-reads the epoch length after a
    resize, with ``train_dataloader()`` returning the same loader each time; on several processes
    ``Trainer(use_distributed_sampler=False)`` (the sampler shards the data itself).
    """

    name = "resize"

    def __init__(self) -> None:
        self.base_batch: int | None = None
        self.sampler: ResizableBatchSampler | None = None

    def setup(self, trainer: Any) -> None:
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("AdaptiveBatchSize(mechanism='resize') changes the epoch's length: set "
                             "Trainer(reload_dataloaders_every_n_epochs=1) (train_dataloader() returning the same "
                             "ResizableDataLoader each time).")
        # Lightning's switch (no public getter): it would replace the sampler with a DistributedSampler.
        if trainer.world_size > 1 and uses_distributed_sampler(trainer):
            raise ValueError("AdaptiveBatchSize(mechanism='resize') shards the data in its ResizableBatchSampler: "
                             "set Trainer(use_distributed_sampler=False).")

    def find_sampler(self, trainer: Any) -> ResizableBatchSampler:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if not isinstance(sampler, ResizableBatchSampler):
            raise TypeError("AdaptiveBatchSize(mechanism='resize') needs a train DataLoader over a "
                            f"ResizableBatchSampler, found {type(sampler).__name__}: return "
                            "lightning_lbo.batch_sampler.ResizableDataLoader(dataset, ResizableBatchSampler(...)) from "
                            "train_dataloader(), or use mechanism='accumulate'.")
        return sampler

    def start(self, trainer: Any, factor: int) -> None:
        """At train start: remember the base batch (fresh run) and check the sampler agrees with ``factor``."""
        self.sampler = self.find_sampler(trainer)
        if self.base_batch is None:
            if factor != 1:
                raise RuntimeError("The resize mechanism lost its base batch size: resume from a checkpoint of the "
                                   "same AdaptiveBatchSize configuration.")
            self.base_batch = self.sampler.batch_size
        self.check(trainer, factor)

    def check(self, trainer: Any, factor: int) -> None:
        sampler = self.find_sampler(trainer)
        if sampler.batch_size != self.base_batch * factor:
            raise RuntimeError(f"The train sampler yields batches of {sampler.batch_size}, AdaptiveBatchSize expects "
                               f"{self.base_batch * factor}: train_dataloader() must return the same "
                               "ResizableDataLoader every time it is called (build it once, e.g. in setup()).")
        self.sampler = sampler

    @staticmethod
    def aligned(batches_done: int, factor: int) -> bool:
        """Any optimizer step will do: the sampler resizes from its next batch on."""
        return True

    def apply(self, trainer: Any, factor: int) -> int | None:
        size = self.base_batch * factor
        self.sampler.set_batch_size(size)
        return size

    def on_batch_end(self, trainer: Any) -> None:
        self.sampler.mark_consumed()

    def state_dict(self) -> dict[str, Any]:
        return {"base_batch": self.base_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_batch = state.get("base_batch", self.base_batch)


MECHANISMS = {"accumulate": Accumulation, "resize": Resize}
