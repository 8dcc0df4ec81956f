"""Critical-batch advisor: train briefly, estimate the gradient noise scale, recommend a batch and LR.

McCandlish et al. 2018 (arXiv 1812.06162): with ``B_noise ~ B_simple = tr(Sigma) / |G|^2``, the steps
``S`` and examples ``E`` to reach a given loss trade off as ``(S / S_min - 1)(E / E_min - 1) = 1``, and
the critical batch ``B_crit = E_min / S_min`` (about ``B_simple``) is where a run takes twice the
minimum steps and twice the minimum examples. Below it, doubling the batch nearly halves the steps;
above it, more batch buys little. The advisor:

1. trains the model for ``steps`` optimizer steps at ``batch_size`` with momentum SGD at ``lr``;
2. estimates ``B_simple`` along the way with :class:`~lightning_lbo.callbacks.GradientNoiseScale`
   (unbiased two-batch-size estimator; per-rank against all-reduced gradients under DDP, otherwise
   the two halves of a batch every ``probe_every_n_steps`` steps);
3. recommends the power of two nearest to the final ``B_simple`` (at most ``max_batch``) and the
   LR for it from ``lr`` by the linear or square-root rule (:func:`recommend`);
4. optionally plots ``B_simple`` over the run next to the batch (:func:`plot_b_simple`).

``B_simple`` grows as the loss falls (McCandlish et al. Fig. 4), so a brief run's estimate is the
critical batch of the early phase: a safe lower end for a batch-size ramp. ``lbo advise`` is the
command-line front end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

SCALINGS = ("linear", "sqrt")


@dataclass
class Advice:
    """The advisor's answer; ``history`` rows are ``(step, global_batch, b_simple)``."""

    b_simple: float
    batch_size: int
    lr: float
    recommended_batch: int
    recommended_lr: float
    scaling: str
    steps: int
    history: list[tuple[int, float, float]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"estimated critical batch (B_simple) after {self.steps} steps at batch {self.batch_size}: "
                f"{self.b_simple:.0f}\nrecommended global batch: {self.recommended_batch}, LR "
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


def advise(model: str = "mlp-bn", batch_size: int = 128, lr: float = 0.1, steps: int = 300,
           scaling: str = "linear", max_batch: int | None = None, probe_every_n_steps: int = 5,
           beta: float = 0.9, seed: int = 0, train_subset: int | None = None, data_dir: str | None = None,
           accelerator: str = "cpu") -> Advice:
    """Train a reference model on Fashion-MNIST briefly and return the :class:`Advice` (see the module doc)."""
    import pytorch_lightning as pl

    from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale
    from lightning_lbo.classifier import ClassifierModule, sgd_factory
    from lightning_lbo.compare import MODELS
    from lightning_lbo.data import FashionMNISTDataModule

    if model not in MODELS:
        raise ValueError(f"Invalid model: {model!r}. Supported: {tuple(MODELS)}.")
    if not isinstance(steps, int) or steps < 2 * probe_every_n_steps:
        raise ValueError(f"Invalid steps: {steps!r}; train at least 2 x probe_every_n_steps steps.")
    pl.seed_everything(seed, verbose=False)
    name, kwargs = MODELS[model][:2]
    module = ClassifierModule(name, optimizer=sgd_factory(lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
                              model_kwargs=kwargs)
    gns = GradientNoiseScale(beta=beta, log_every_n_steps=probe_every_n_steps, probe_every_n_steps=probe_every_n_steps)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, callbacks=[gns],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    dm = FashionMNISTDataModule(batch_size=batch_size, train_subset=train_subset, data_dir=data_dir, seed=seed,
                                drop_last=True)
    trainer.fit(module, datamodule=dm)
    b_simple = gns.b_simple()
    batch, new_lr = recommend(b_simple, batch_size, lr, scaling, max_batch)
    return Advice(b_simple, batch_size, lr, batch, new_lr, scaling, trainer.global_step, list(gns.history))


def plot_b_simple(advice: Advice, path: str) -> None:
    """``B_simple`` over the run (log scale) with the training batch and the recommendation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in advice.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h[2] for h in advice.history], label="B_simple (EMA)")
    ax.plot(steps, [h[1] for h in advice.history], "--", label="training batch")
    ax.axhline(advice.recommended_batch, color="k", lw=0.8, ls=":", label=f"recommended {advice.recommended_batch}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("batch size")
    ax.set_title("Gradient noise scale (critical batch estimate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        advice = advise(args.model, args.batch_size, args.lr, args.steps, args.scaling, args.max_batch,
                        args.probe_every, args.beta, args.seed, args.train_subset or None, args.data_dir,
                        args.accelerator)
    except ValueError as err:
        print(f"lbo advise: {err}", file=sys.stderr)
        return 2
    print(advice.summary())
    if args.plot:
        plot_b_simple(advice, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(advice), fh, indent=1)
    return 0


def add_advise_parser(sub: argparse._SubParsersAction) -> None:
    from lightning_lbo.cli import COMMANDS

    p = sub.add_parser("advise", help=COMMANDS["advise"][2],
                       description="Train briefly on Fashion-MNIST, estimate the gradient noise scale B_simple "
                                   "(McCandlish et al. 2018) and print the critical batch, a recommended batch and "
                                   "LR, and optionally plot B_simple over the run.")
    p.add_argument("--model", default="mlp-bn", help="reference model: cnn, mlp-bn, mlp, resnet, resnet8")
    p.add_argument("--batch-size", type=int, default=128, help="batch of the brief run (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="momentum-SGD LR of the brief run (default 0.1)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the brief run (default 300)")
    p.add_argument("--scaling", default="linear", choices=SCALINGS, help="LR rule for the recommended batch")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the recommended batch")
    p.add_argument("--probe-every", type=int, default=5, help="estimate every N steps (default 5)")
    p.add_argument("--beta", type=float, default=0.9, help="EMA decay of the estimator per estimate (default 0.9)")
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 60000)")
    p.add_argument("--data-dir", default=None, help="where to look for Fashion-MNIST first (see lbo data)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--plot", default=None, help="write a PNG of B_simple over the run here")
    p.add_argument("--json", default=None, help="write the advice (with the B_simple history) as JSON here")
    p.set_defaults(func=_run)
