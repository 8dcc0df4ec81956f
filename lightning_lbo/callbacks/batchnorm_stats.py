"""BatchNorm evaluation statistics without moving averages: Akiba's last minibatches, or precise BN.

The numerics are in :mod:`lightning_lbo.batchnorm`; this callback decides when they run (before each
validation outside the sanity check, and at the end of training) and logs how many samples went in.
Cross-rank pooling uses ``trainer.strategy.reduce(t, reduce_op="sum")`` (a torch.distributed
all-reduce under DDP; the identity on one device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_lbo.batchnorm import (
    BatchNormMomentRecorder,
    BatchNormStatistics,
    ReduceSum,
    batchnorm_layers,
    estimate_precise_stats,
)
from lightning_lbo.callbacks._sharded import data_parallel_size
from lightning_lbo.compat import callback_bases, callback_state_key


class BatchNormStatsMode(str, Enum):
    """Where evaluation-time BN statistics come from."""

    LAST_BATCHES = "last_batches"
    PRECISE = "precise"


DEFAULT_NUM_BATCHES = {BatchNormStatsMode.LAST_BATCHES: 1, BatchNormStatsMode.PRECISE: 50}


def first_tensor_forward(module: nn.Module, batch: Any) -> Any:
    """Default forward of the estimation pass: ``module(batch[0])`` for ``(x, y, ...)``, else ``module(batch)``."""
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    if isinstance(batch, Tensor):
        return module(batch)
    raise TypeError(f"Cannot find the model input in a batch of type {type(batch).__name__}; "
                    "pass BatchNormStats(forward_fn=lambda module, batch: module(...)).")


def _rank_zero_warn(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)


@contextlib.contextmanager
def _rng_preserved(loader: Any, device: torch.device) -> Iterator[None]:
    """Iterating a loader draws from the global RNG and from a sampler's generator: put both back."""
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    generators = [getattr(s, "generator", None) for s in samplers]
    generators = [g for g in dict.fromkeys(generators) if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)


class BatchNormStats(*callback_bases()):
    """Evaluate with BN statistics of the last training batches (Akiba et al. 2017) or precise BN.

    * ``mode="last_batches"``: forward pre-hooks keep the per-channel moments of the last
      ``num_batches`` training forward passes of every BN layer (no host sync per step); before
      validation they are pooled over the window and all ranks (mean of variances + variance of
      means, weighted by counts) and installed as ``running_mean`` / ``running_var``.
    * ``mode="precise"``: before validation, the population statistics of every BN input over
      ``num_batches`` training batches are recomputed with the current weights (the model in eval
      mode, its BN layers in training mode, no grad, curvature capture paused), pooled over ranks and
      installed; every module's mode and BN setting is restored.

    Statistics are installed before each validation after training started and at the end of
    training (so the fitted model evaluates with them), only if training batches ran since the last
    install. Training is unchanged: training-mode BN normalises with batch statistics, and the
    estimation pass restores the RNG. The installed values stay in the buffers (and checkpoints);
    the moving average continues from them.

    Args:
        mode: ``"last_batches"`` or ``"precise"``.
        num_batches: batches behind the statistics per rank: the window (default 1) or the number of
            estimation batches (default 50).
        dataloader: batches for precise mode instead of the Trainer's train dataloader (required for
            ``trainer.validate()`` without a datamodule that has ``train_dataloader``).
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model in precise mode (default:
            :func:`first_tensor_forward`).
        log_prefix: prefix of the logged ``samples`` and ``batches`` metrics.

    Example::

        trainer = Trainer(callbacks=[BatchNormStats(mode="precise", num_batches=20)])
    """

    def __init__(self, mode: str | BatchNormStatsMode = BatchNormStatsMode.LAST_BATCHES, num_batches: int | None = None,
                 dataloader: Any = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 log_prefix: str = "batchnorm_stats") -> None:
        try:
            self.mode = BatchNormStatsMode(mode)
        except ValueError:
            choices = tuple(m.value for m in BatchNormStatsMode)
            raise ValueError(f"Invalid mode: {mode!r}. Supported: {choices}.") from None
        if num_batches is None:
            num_batches = DEFAULT_NUM_BATCHES[self.mode]
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"Invalid num_batches: {num_batches!r}; use a positive integer (batches per rank).")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError("forward_fn must be callable as forward_fn(pl_module, batch), "
                            f"got {type(forward_fn).__name__}.")
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.forward_fn = forward_fn or first_tensor_forward
        self.log_prefix = log_prefix
        self.num_samples = 0  # examples behind the installed statistics, all ranks
        self.num_batches_used = 0  # batches behind them, summed over ranks
        self._batches_seen = 0  # training batches run (the staleness clock)
        self._installed_at: int | None = None
        self._recorder: BatchNormMomentRecorder | None = None
        self._loaded_window: dict[str, Any] | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, mode=self.mode.value, num_batches=self.num_batches)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        replicas = data_parallel_size(trainer)
        if replicas != trainer.world_size:
            raise ValueError(f"BatchNormStats pools the statistics of every rank, but this strategy runs "
                             f"{trainer.world_size} ranks on {replicas} data-parallel replicas (tensor or model "
                             "parallelism): ranks that share a batch would count it several times. Use "
                             "tensor_parallel_size=1, or evaluate with the running statistics (drop the callback).")

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        layers = self._layers(trainer, pl_module)
        if self.mode is BatchNormStatsMode.LAST_BATCHES and layers:
            if self._recorder is None or self._recorder.layers != layers:
                self._recorder = BatchNormMomentRecorder(layers, window=self.num_batches)
            self._recorder.attach()
            if self._loaded_window is not None:
                self._recorder.load_state_dict(self._loaded_window)
                self._loaded_window = None

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches_seen += 1

    def discard_cycle_where(self, bad: torch.Tensor) -> None:
        """Forget the batches of the accumulation cycle that just ended where ``bad`` is true.

        Called by :class:`~lightning_lbo.callbacks.NonFiniteBatchGuard` after a skipped (non-finite) step, so
        that the window holds the same batches as a run in which the bad ones were dropped.
        """
        if self._recorder is not None:
            self._recorder.discard_cycle_where(bad)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.refresh(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.refresh(trainer, pl_module)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.detach()  # the window is kept: it is checkpoint state

    # ------------------------------------------------------------------ work
    def refresh(self, trainer: Any, pl_module: Any) -> BatchNormStatistics | None:
        """Estimate and install the statistics now (collective under DDP: call on every rank)."""
        if not self._layers(trainer, pl_module):
            return None
        if self._installed_at is not None and self._installed_at == self._batches_seen:
            return None  # no training batch since the last install: the buffers are current
        reduce_sum = self._reduce_sum(trainer)
        if self.mode is BatchNormStatsMode.LAST_BATCHES:
            stats = self._last_batches(trainer, reduce_sum)
        else:
            stats = self._precise(trainer, pl_module, reduce_sum)
        if stats is None:
            return None
        stats.install()
        self._installed_at = self._batches_seen
        self.num_samples, self.num_batches_used = stats.num_samples, stats.num_batches
        if stats.skipped:
            self._warn_once(trainer, "skipped", f"BatchNormStats: {len(stats.skipped)} BatchNorm layer(s) saw no "
                            "input in the batches used; their running statistics were left as they were.")
        metrics = {f"{self.log_prefix}/samples": float(stats.num_samples),
                   f"{self.log_prefix}/batches": float(stats.num_batches)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return stats

    def _last_batches(self, trainer: Any, reduce_sum: ReduceSum | None) -> BatchNormStatistics | None:
        recorder = self._recorder
        if recorder is None:
            self._warn_once(trainer, "no_fit", (
                "BatchNormStats(mode='last_batches') has no training batches to take statistics from "
                "(trainer.validate/test without trainer.fit): evaluating with the model's stored running_mean/"
                "running_var (the last-batch statistics if it was trained with this callback). To recompute "
                "them, use BatchNormStats(mode='precise', dataloader=<train loader>)."))
            return None
        stats = recorder.statistics(reduce_sum)
        if stats.num_batches == 0:
            self._warn_once(trainer, "empty", "BatchNormStats(mode='last_batches'): no training batch was recorded "
                            "yet; keeping the current running statistics.")
            return None
        return stats

    def _precise(self, trainer: Any, pl_module: Any, reduce_sum: ReduceSum | None) -> BatchNormStatistics:
        loader = self._train_batches(trainer)
        length = _safe_len(loader)
        strategy = trainer.strategy

        def forward(batch: Any) -> Any:
            return self.forward_fn(pl_module, strategy.batch_to_device(batch))

        with _rng_preserved(loader, pl_module.device):
            stats = estimate_precise_stats(pl_module, loader, self.num_batches, forward, reduce_sum,
                                           forward_context=trainer.precision_plugin.train_step_context)
        if stats.num_batches < self.num_batches * trainer.world_size:
            have = f"{length} batches" if length is not None else "fewer batches"
            self._warn_once(trainer, "short", (
                f"BatchNormStats(mode='precise', num_batches={self.num_batches}): the train dataloader has {have} "
                f"per rank; used all of them ({stats.num_batches} batches, {stats.num_samples} samples over all "
                "ranks). Lower num_batches to silence this."))
        return stats

    def _train_batches(self, trainer: Any) -> Any:
        if self.dataloader is not None:
            return self.dataloader
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            try:
                loader = trainer.datamodule.train_dataloader()
            except Exception as err:  # a datamodule set up for validation only may not have one
                raise RuntimeError(self._no_loader_message()) from err
        if loader is None:
            raise RuntimeError(self._no_loader_message())
        if isinstance(loader, (dict, list, tuple)):
            raise TypeError("BatchNormStats(mode='precise') found several train dataloaders; pass the one to "
                            "estimate with as BatchNormStats(dataloader=...).")
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
            self._warn_once(trainer, "persistent", (
                "BatchNormStats(mode='precise') iterates the train dataloader, whose persistent workers share one "
                "iterator: a validation in the middle of an epoch restarts that epoch's iterator. Pass a separate "
                "loader as BatchNormStats(dataloader=...)."))
        return loader

    @staticmethod
    def _no_loader_message() -> str:
        return ("BatchNormStats(mode='precise') needs training batches, but this run (trainer.validate/test "
                "without fit) has no train dataloader: pass BatchNormStats(dataloader=<train loader>) or a "
                "datamodule whose train_dataloader() works in this stage.")

    def _layers(self, trainer: Any, pl_module: Any) -> list[nn.Module]:
        layers = batchnorm_layers(pl_module)
        if not layers:
            self._warn_once(trainer, "no_bn", f"BatchNormStats: {type(pl_module).__name__} has no BatchNorm layer "
                            "with running statistics; the callback does nothing.")
        return layers

    @staticmethod
    def _reduce_sum(trainer: Any) -> ReduceSum | None:
        if trainer.world_size <= 1:
            return None
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def _warn_once(self, trainer: Any, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _rank_zero_warn(trainer, message)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        # A window is per rank and only rank 0's is saved: keep it for single-process resumes only.
        window = None
        if self._recorder is not None and _world_size() == 1:
            window = self._recorder.state_dict()
        return {"mode": self.mode.value, "num_batches": self.num_batches, "num_samples": self.num_samples,
                "num_batches_used": self.num_batches_used, "batches_seen": self._batches_seen,
                "installed_at": self._installed_at, "window": window}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_samples = state_dict.get("num_samples", 0)
        self.num_batches_used = state_dict.get("num_batches_used", 0)
        self._batches_seen = state_dict.get("batches_seen", 0)
        self._installed_at = state_dict.get("installed_at")
        window = state_dict.get("window")
        if window is not None and _world_size() == 1:
            if self._recorder is not None:
                self._recorder.load_state_dict(window)
            else:
                self._loaded_window = window


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
