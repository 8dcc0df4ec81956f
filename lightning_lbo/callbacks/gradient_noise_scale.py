"""Log the simple gradient noise scale ``B_simple`` (McCandlish et al. 2018) next to the global batch.

``B_simple = tr(Sigma) / |G|^2`` estimates the batch size up to which a larger batch cuts the number of
steps almost proportionally. The two norms it needs come almost for free from training:

* "small": each micro-batch's gradient on each process, read by a tensor hook on every parameter
  *before* it is accumulated into ``.grad`` (:class:`~lightning_lbo.noise_scale.MicroBatchGradNorms`).
  DistributedDataParallel averages the accumulated ``.grad`` across ranks in its reducer, after these
  hooks ran, so they see the rank-local gradient. (Reading ``.grad`` in ``on_after_backward`` would
  not work: by then DDP has written the averaged gradient back.)
* "big": the gradient the optimizer steps with (``on_before_optimizer_step``: averaged over
  ``accumulate_grad_batches`` micro-batches and all ranks, unscaled by AMP).

So ``B_small`` is the per-device batch and ``B_big`` = per-device batch x micro-batches x world size.
On one process without accumulation there is a single batch size; then every ``probe_every_n_steps``
steps a probe splits the step's first batch in two halves and measures their gradients
(:func:`~lightning_lbo.noise_scale.split_batch_sq_norms`: one extra forward and backward, ``B_small``
= half the batch; ``probe_every_n_steps=None`` skips such steps instead). The numerator and
denominator are EMA-smoothed separately on each rank (no host sync per step); at logging steps their
mean over ranks (one 2-element all-reduce) gives ``B_simple``.

Limitations: fp16 mixed precision with a GradScaler is rejected (the hooks would see scaled
gradients); micro-batches are assumed to be of equal size (use ``drop_last=True`` for exact results);
``FSDPStrategy`` (FSDP1) is rejected at setup.

Sharded parameters (``ModelParallelStrategy`` + ``fully_shard``, FSDP2): FSDP reduce-scatters every
backward's gradient itself, so no rank sees its own; "small" is then the gradient of one micro-batch of
*all* ranks, read as what its backward added to the accumulated sharded ``.grad``
(:class:`~lightning_lbo.noise_scale.ShardedMicroBatchGradNorms`): ``B_small`` = per-device batch x ranks,
``B_big`` = ``B_small`` x ``accumulate_grad_batches``, which must then be >= 2 (with 1 there is a single
batch size and steps are skipped, with a warning).
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_lbo._dtensor import any_dtensor
from lightning_lbo.callbacks._sharded import data_parallel_size, parameter_sharding
from lightning_lbo.compat import callback_bases, lightning_package, package_of
from lightning_lbo.hessian.hvp import first_dim_count
from lightning_lbo.noise_scale import (
    MicroBatchGradNorms,
    NoiseScaleEstimator,
    ShardedMicroBatchGradNorms,
    grad_sq_norm,
    split_batch_sq_norms,
)

_FSDP1_MESSAGE = ("GradientNoiseScale does not support FSDPStrategy (FSDP1 flat parameters): it reads per-rank or "
                  "per-micro-batch gradients that FSDP1 keeps inside its flat shards. Instead, use "
                  "ModelParallelStrategy with fully_shard (and accumulate_grad_batches >= 2) or strategy='ddp'.")


class GradientNoiseScale(*callback_bases()):
    """Estimate and log ``B_simple`` from per-rank/micro-batch and global gradient norms.

    Logged every ``log_every_n_steps`` optimizer steps: ``noise_scale/b_simple``,
    ``noise_scale/grad_sq`` (``|G|^2``), ``noise_scale/trace`` (``tr Sigma``) and
    ``noise_scale/global_batch`` (the batch of the current step: per-device x accumulation x world).

    Args:
        beta: EMA decay of the two terms per update (McCandlish et al. smooth over many steps).
        log_every_n_steps: logging interval (default: the Trainer's ``log_every_n_steps``).
        probe_every_n_steps: with a single batch size (one process, no accumulation), measure by the
            two-halves probe every this many optimizer steps; ``None``: skip those steps.

    :attr:`history` keeps ``(global_step, global_batch, b_simple)`` of every logging step (mean over ranks),
:attr:`last_terms` the rank-averaged ``[|G|^2, tr(Sigma)]`` of the last one;
    :meth:`reduced_b_simple` gives the current estimate on every rank (a collective).

    Example::

        trainer = Trainer(strategy="ddp", devices=8, callbacks=[GradientNoiseScale(beta=0.99)])
    """

    def __init__(self, beta: float = 0.99, log_every_n_steps: int | None = None,
                 probe_every_n_steps: int | None = 10) -> None:
        super().__init__()
        for name, value in (("log_every_n_steps", log_every_n_steps), ("probe_every_n_steps", probe_every_n_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Invalid {name}: {value!r}; use a positive integer or None.")
        self.probe_every_n_steps = probe_every_n_steps
        self._probe: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self.history: list[tuple[int, float, float]] = []
        # [|G|^2, tr(Sigma)] averaged over ranks at the last logging step (the terms of history[-1])
        self.last_terms: torch.Tensor | None = None
        self.estimator = NoiseScaleEstimator(beta)  # validates beta
        self.log_every_n_steps = log_every_n_steps
        self._norms: MicroBatchGradNorms | None = None
        self._sharded: ShardedMicroBatchGradNorms | None = None
        self._micro_sizes: list[int] = []
        self._warned = False
        self.last: dict[str, float] = {}

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("GradientNoiseScale reads the gradient Lightning's automatic optimization steps with; "
                               "use automatic optimization or remove the callback.")
        if parameter_sharding(trainer) == "FSDPStrategy":
            raise ValueError(_FSDP1_MESSAGE)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("GradientNoiseScale does not support fp16 mixed precision with a GradScaler (its hooks "
                             "would see loss-scaled gradients): use precision='bf16-mixed' or '32-true'.")

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradientNoiseScale needs exactly one optimizer, found {len(trainer.optimizers)}.")
        params = [p for group in trainer.optimizers[0].param_groups for p in group["params"] if p.requires_grad]
        self._params = params
        if any_dtensor(params):  # fully_shard: per-micro-batch gradients of all ranks, from the accumulated shards
            self._sharded = ShardedMicroBatchGradNorms(
                params, trainer.world_size, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
            return
        self._norms = MicroBatchGradNorms(params)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._norms is not None:
            self._norms.remove()
            self._norms = None

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        first = not self._micro_sizes
        self._micro_sizes.append(first_dim_count(batch))
        if self._sharded is not None:
            if first:
                self._sharded.start_window()
            return
        single_size = trainer.world_size == 1 and trainer.accumulate_grad_batches == 1
        self._norms.enabled = not single_size  # one batch size: the per-backward norms would go unread
        every = self.probe_every_n_steps
        if first and every is not None and single_size and trainer.global_step % every == 0:
            self._probe = split_batch_sq_norms(pl_module, batch, self._params)

    @override
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._sharded is not None and trainer.accumulate_grad_batches >= 2:
            self._sharded.after_backward()

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._sharded is not None:
            self._sharded_step(trainer, pl_module)
            return
        sizes, self._micro_sizes = self._micro_sizes, []
        micro, k, world = len(sizes), trainer.accumulate_grad_batches, trainer.world_size
        b_small = sum(sizes) / max(micro, 1)
        b_big = b_small * micro * world
        probe, self._probe = self._probe, None
        if micro == 0 or b_big <= b_small:
            if probe is not None:
                self.estimator.update(*probe)
                self._maybe_log(trainer, pl_module, b_big)
                return
            if self.probe_every_n_steps is None and not self._warned:
                self._warned = True
                lightning_package(package_of(trainer)).utilities.rank_zero_warn(
                    "GradientNoiseScale needs two batch sizes: train on >= 2 processes (DDP) or with "
                    "accumulate_grad_batches >= 2, or set probe_every_n_steps. Steps with a single batch size are "
                    "skipped.")
            return
        # Lightning divides each micro-batch loss by k: undo it, so both are gradients of mean losses.
        small_sq = self._norms.pop() * (k * k / micro)
        big_sq = grad_sq_norm(self._params) * (k / micro) ** 2
        self.estimator.update(small_sq, big_sq, b_small, b_big)
        self._maybe_log(trainer, pl_module, b_big / micro * k)

    def _sharded_step(self, trainer: Any, pl_module: Any) -> None:
        """Under fully_shard: micro-batches of all ranks against their accumulated gradient."""
        sizes, self._micro_sizes = self._micro_sizes, []
        k = trainer.accumulate_grad_batches
        if k < 2 or len(sizes) < 2:  # one batch size (every rank alike: no collective is skipped on one only)
            if not self._warned:
                self._warned = True
                lightning_package(package_of(trainer)).utilities.rank_zero_warn(
                    "GradientNoiseScale under sharded parameters (fully_shard) compares the micro-batches of an "
                    "accumulation window with their sum: set accumulate_grad_batches >= 2. Steps with a single "
                    "batch size are skipped.")
            return
        micro_sq, big_sq, micro = self._sharded.pop()  # one all-reduce of two numbers
        b_small = sum(sizes) / micro * data_parallel_size(trainer)
        # Lightning divides each micro-batch loss by k: undo it, so both are gradients of mean losses.
        small_sq = micro_sq * (k * k / micro)
        big_sq = big_sq * (k / micro) ** 2
        self.estimator.update(small_sq, big_sq, b_small, b_small * micro)
        self._maybe_log(trainer, pl_module, b_small * micro)

    def _maybe_log(self, trainer: Any, pl_module: Any, global_batch: float) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            self._log(trainer, pl_module, global_batch)

    def reduced_terms(self, trainer: Any) -> torch.Tensor:
        """``[|G|^2, tr(Sigma)]`` averaged over ranks (a collective: call it on every rank)."""
        terms = torch.stack([self.estimator.grad_sq(), self.estimator.trace()]).float()
        return trainer.strategy.reduce(terms, reduce_op="mean")  # linear EMAs: mean of EMAs = EMA of means

    def reduced_b_simple(self, trainer: Any) -> float:
        """``B_simple`` of the rank-averaged terms, the same on every rank (a collective and a host sync)."""
        terms = self.reduced_terms(trainer)
        return float(terms[1] / terms[0])

    def _log(self, trainer: Any, pl_module: Any, global_batch: float) -> None:
        terms = self.reduced_terms(trainer)
        b_simple = terms[1] / terms[0]
        self.history.append((trainer.global_step, float(global_batch), float(b_simple)))
        pl_module.log("noise_scale/b_simple", b_simple, on_step=True, on_epoch=False)
        pl_module.log("noise_scale/grad_sq", terms[0], on_step=True, on_epoch=False)
        pl_module.log("noise_scale/trace", terms[1], on_step=True, on_epoch=False)
        pl_module.log("noise_scale/global_batch", float(global_batch), on_step=True, on_epoch=False)
        self.last_terms = terms

    def b_simple(self) -> float:
        """This rank's current estimate (host sync; for inspection, not for the training loop)."""
        return float(self.estimator.b_simple())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict(), "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "estimator" in state_dict:
            self.estimator.load_state_dict(state_dict["estimator"])
        self.history = list(state_dict.get("history", []))
