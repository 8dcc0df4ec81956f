"""Critical-batch advisor: train to a target, estimate the gradient noise scale there, recommend a batch and LR.

McCandlish et al. 2018 (arXiv 1812.06162): with ``B_noise ~ B_simple = tr(Sigma) / |G|^2``, the steps
``S`` and examples ``E`` to reach a given loss trade off as ``(S / S_min - 1)(E / E_min - 1) = 1``, and
the critical batch ``B_crit = E_min / S_min`` (about ``B_simple``) is where a run takes twice the
minimum steps and twice the minimum examples. Below it, doubling the batch nearly halves the steps;
above it, more batch buys little. ``B_simple`` is not a constant of the problem: it grows as the loss
falls (their Fig. 4; a SmallCNN on Fashion-MNIST goes from about 40 at initialisation to several
hundred within two epochs), and the critical batch *for reaching a target* is governed by the noise
scale near that target. So the advisor:

1. trains the model with momentum SGD at ``lr`` and ``batch_size`` until the validated ``monitor``
   (``val_acc`` or ``val_loss``, on ``val_size`` held-out images every ``val_every_n_steps`` steps)
   reaches ``target``, or for at most ``steps`` optimizer steps (without a target: exactly ``steps``);
2. estimates ``B_simple`` along the way with :class:`~lightning_lbo.callbacks.GradientNoiseScale`
   (unbiased two-batch-size estimator: the two halves of a batch every ``probe_every_n_steps``
   steps), keeping the whole trace;
3. takes the estimate of the last ``window`` steps, just before the target was reached (the ratio of
   the window means of ``tr(Sigma)`` and ``|G|^2``, :func:`window_b_simple`), and recommends the
   power of two nearest to it (at most ``max_batch``) with the LR for it by the linear or square-root
   rule (:func:`recommend`);
4. says at which point of training the estimate holds (:meth:`Advice.summary`) and optionally plots
   ``B_simple`` over the run (:func:`plot_b_simple`).

Without a target, the estimate is the critical batch at step ``steps``: for a brief run, that of the
early phase, a lower end for a batch-size ramp. ``lbo advise`` is the command-line front end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from typing_extensions import override

from lightning_lbo._checks import positive_int

# The command line's choices live with its parser in lightning_lbo.advise_cli (light: `lbo advise --help`
# imports neither torch nor Lightning); add_advise_parser stays importable from its older home here.
from lightning_lbo.advise_cli import MONITORS, SCALINGS, add_advise_parser  # noqa: F401
from lightning_lbo.compat import callback_bases


@dataclass
class Advice:
    """The advisor's answer.

    ``history`` rows are ``(step, global_batch, b_simple, grad_sq, trace)`` at every estimate
    (``b_simple`` of the EMA-smoothed terms, as :class:`GradientNoiseScale` logs it);
    ``validation`` rows are ``(step, monitored value)``. ``b_simple`` is the estimate of the window
    of steps ``window_start``-``steps``, the recommendation's basis. ``target_step`` is the step at
    which ``monitor`` reached ``target`` (``None``: no target, or not reached within the budget).
    """

    b_simple: float
    batch_size: int
    lr: float
    recommended_batch: int
    recommended_lr: float
    scaling: str
    steps: int
    window_start: int = 0
    target: float | None = None
    monitor: str = "val_acc"
    target_step: int | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)
    history: list[tuple[int, float, float, float, float]] = field(default_factory=list)

    def where(self) -> str:
        """At which point of training the estimate holds, in words."""
        if self.target is None:
            return (f"no target given: this is the critical batch at step {self.steps} of training, not of a "
                    "whole run (B_simple grows as the loss falls; give a target to measure it there)")
        if self.target_step is not None:
            return (f"{self.monitor} reached {self.target:g} at step {self.target_step}: the estimate is the noise "
                    "scale just before that target, McCandlish et al.'s estimate of the critical batch for training "
                    "to it (at this run's constant LR: a decaying LR raises B_simple further)")
        reached = [v for _, v in self.validation]
        best = (max if MONITORS[self.monitor] == "max" else min)(reached) if reached else float("nan")
        return (f"{self.monitor} did not reach {self.target:g} within {self.steps} steps (best {best:.4g}): the "
                "estimate holds before the target and underestimates its critical batch; raise the step budget")

    def summary(self) -> str:
        marks = self.history[:: max(1, len(self.history) // 6)] + self.history[-1:]
        trace = ", ".join(f"{row[0]}: {row[2]:.0f}" for row in dict.fromkeys(marks))
        return (f"estimated critical batch (B_simple over steps {self.window_start}-{self.steps} at batch "
                f"{self.batch_size}): {self.b_simple:.0f}\n{self.where()}\nB_simple along the run (step: EMA "
                f"estimate): {trace}\nrecommended global batch: {self.recommended_batch}, LR "
                f"{self.recommended_lr:.4g} ({self.scaling} rule from LR {self.lr:g} at batch {self.batch_size})")


def recommend(b_simple: float, batch_size: int, lr: float, scaling: str = "linear",
              max_batch: int | None = None) -> tuple[int, float]:
    """``(batch, lr)``: the power of two nearest ``b_simple`` (in log scale, capped), the LR scaled to it.

    >>> recommend(700.0, 128, 0.1)
    (512, 0.4)
    """
    if scaling not in SCALINGS:
        raise ValueError(f"Invalid scaling: {scaling!r}. Supported: {SCALINGS}.")
    if not (math.isfinite(b_simple) and b_simple > 0):
        raise ValueError(f"B_simple is {b_simple}: the estimate did not settle (train longer, or raise beta's "
                         "smoothing); no batch can be recommended.")
    batch = 2 ** round(math.log2(b_simple))
    if max_batch is not None:
        batch = min(batch, max_batch)
    ratio = batch / batch_size
    return batch, lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def window_b_simple(history: list[tuple[int, float, float, float, float]], window: int) -> tuple[float, int]:
    """``(B_simple, first step)`` of the estimates in the last ``window`` steps of ``history``.

    The ratio of the window means of ``tr(Sigma)`` and ``|G|^2`` (each term averaged separately, as
    the paper smooths them, so that a near-zero ``|G|^2`` at one step does not dominate). Rows are
    ``(step, global_batch, b_simple, grad_sq, trace)`` in step order; the window holds the rows with
    ``step > last step - window``.
    """
    if not history:
        raise ValueError("No noise-scale estimate was made: train for at least one probe step.")
    last = history[-1][0]
    rows = [row for row in history if row[0] > last - window]
    grad_sq = sum(row[3] for row in rows) / len(rows)
    trace = sum(row[4] for row in rows) / len(rows)
    return (trace / grad_sq if grad_sq > 0 else math.nan), rows[0][0]


def check_arguments(batch_size: int, lr: float, steps: int, window: int, probe_every_n_steps: int,
                    max_batch: int | None, target: float | None, monitor: str, val_every_n_steps: int,
                    val_size: int) -> None:
    """Reject bad advisor arguments before any training, naming the fix."""
    for name, value in (("batch_size", batch_size), ("steps", steps), ("window", window),
                        ("probe_every_n_steps", probe_every_n_steps), ("val_every_n_steps", val_every_n_steps)):
        positive_int(name, value)
    if max_batch is not None:
        positive_int("max_batch", max_batch)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid lr: {lr!r}; use a positive number.")
    if window < 2 * probe_every_n_steps:
        raise ValueError(f"Invalid window: {window}; it must hold at least two estimates, so use window >= "
                         f"2 x probe_every_n_steps = {2 * probe_every_n_steps}.")
    if window > steps:
        raise ValueError(f"Invalid window: {window} is longer than the step budget ({steps}); use window <= steps.")
    if monitor not in MONITORS:
        raise ValueError(f"Invalid monitor: {monitor!r}. Supported: {tuple(MONITORS)}.")
    if target is not None:
        if monitor == "val_acc" and not 0 < target <= 1:
            raise ValueError(f"Invalid target: {target!r}; a val_acc target is a fraction in (0, 1], e.g. 0.85.")
        if monitor == "val_loss" and not target > 0:
            raise ValueError(f"Invalid target: {target!r}; a val_loss target is a positive loss.")
        if not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"Invalid val_size: {val_size!r}; a target needs held-out images: use val_size >= 1.")


def target_reached(value: float, target: float, monitor: str) -> bool:
    """Whether a validated ``monitor`` value has reached ``target`` (accuracy from below, loss from above)."""
    return value >= target if MONITORS[monitor] == "max" else value <= target


def advise(model: str = "mlp-bn", batch_size: int = 128, lr: float = 0.1, steps: int = 300,
           scaling: str = "linear", max_batch: int | None = None, probe_every_n_steps: int = 5,
           beta: float = 0.9, seed: int = 0, train_subset: int | None = None, data_dir: str | None = None,
           accelerator: str = "cpu", target: float | None = None, monitor: str = "val_acc", window: int = 100,
           val_every_n_steps: int = 50, val_size: int = 5000) -> Advice:
    """Train a reference model on Fashion-MNIST and return the :class:`Advice` (see the module doc).

    Args:
        steps: the step budget; without ``target``, the run's length.
        target: stop at the first validation at which ``monitor`` reaches it (``None``: train ``steps``).
        monitor: ``"val_acc"`` (reached from below) or ``"val_loss"`` (from above).
        window: the estimate is that of the last ``window`` optimizer steps of the run (the window means
            of the callback's EMA terms, which themselves reach back about ``1 / (1 - beta)`` estimates).
        val_every_n_steps, val_size: how often, and on how many held-out training images, to validate
            (only with a target).
    """
    import pytorch_lightning as pl

    from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale
    from lightning_lbo.classifier import ClassifierModule, sgd_factory
    from lightning_lbo.compare import MODELS
    from lightning_lbo.data import FashionMNISTDataModule

    if model not in MODELS:
        raise ValueError(f"Invalid model: {model!r}. Supported: {tuple(MODELS)}.")
    check_arguments(batch_size, lr, steps, window, probe_every_n_steps, max_batch, target, monitor,
                    val_every_n_steps, val_size)
    pl.seed_everything(seed, verbose=False)
    name, kwargs = MODELS[model][:2]
    module = ClassifierModule(name, optimizer=sgd_factory(lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
                              model_kwargs=kwargs)
    gns = GradientNoiseScale(beta=beta, log_every_n_steps=probe_every_n_steps, probe_every_n_steps=probe_every_n_steps)
    trace = NoiseScaleTrace(gns)
    stop = StopAtTarget(target, monitor) if target is not None else None
    callbacks: list[Any] = [gns, trace] + ([stop] if stop else [])
    validate: dict[str, Any] = {"limit_val_batches": 0}
    if stop is not None:
        validate = {"val_check_interval": val_every_n_steps, "check_val_every_n_epoch": None}
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, **validate)
    dm = FashionMNISTDataModule(batch_size=batch_size, train_subset=train_subset, data_dir=data_dir, seed=seed,
                                drop_last=True, val_size=val_size if target is not None else 0,
                                eval_batch_size=max(batch_size, 1000))
    trainer.fit(module, datamodule=dm)
    b_simple, window_start = window_b_simple(trace.rows, window)
    batch, new_lr = recommend(b_simple, batch_size, lr, scaling, max_batch)
    return Advice(b_simple, batch_size, lr, batch, new_lr, scaling, trainer.global_step, window_start, target, monitor,
                  stop.reached_at if stop else None, stop.values if stop else [], trace.rows)


class NoiseScaleTrace(*callback_bases()):
    """Record ``(step, global_batch, b_simple, grad_sq, trace)`` at each estimate a GradientNoiseScale logs.

    Placed after the :class:`GradientNoiseScale` in the callback list: it reads the rank-averaged terms
    the callback just logged with a new row of its history (a host sync at logging steps only).
    """

    def __init__(self, gns: Any) -> None:
        super().__init__()
        self.gns = gns
        self.rows: list[tuple[int, float, float, float, float]] = []

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if len(self.gns.history) > len(self.rows):
            step, batch, b_simple = self.gns.history[-1]
            grad_sq, trace = self.gns.last_terms.tolist()
            self.rows.append((step, batch, b_simple, grad_sq, trace))


class StopAtTarget(*callback_bases()):
    """Stop training at the first validation at which ``monitor`` reaches ``target``; keep every value."""

    def __init__(self, target: float, monitor: str) -> None:
        super().__init__()
        self.target, self.monitor = target, monitor
        self.values: list[tuple[int, float]] = []
        self.reached_at: int | None = None

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.values.append((trainer.global_step, value))
        if self.reached_at is None and target_reached(value, self.target, self.monitor):
            self.reached_at = trainer.global_step
            trainer.should_stop = True


def plot_b_simple(advice: Advice, path: str) -> None:
    """``B_simple`` over the run (log scale): the training batch, the estimate's window and the target step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in advice.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h[2] for h in advice.history], label="B_simple (EMA)")
    ax.plot(steps, [h[1] for h in advice.history], "--", label="training batch")
    ax.axvspan(advice.window_start, advice.steps, color="0.85", label=f"window: estimate {advice.b_simple:.0f}")
    ax.axhline(advice.recommended_batch, color="k", lw=0.8, ls=":", label=f"recommended {advice.recommended_batch}")
    if advice.target_step is not None:
        ax.axvline(advice.target_step, color="tab:red", lw=0.8,
                   label=f"{advice.monitor} reached {advice.target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("batch size")
    ax.set_title("Gradient noise scale (critical batch estimate)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
