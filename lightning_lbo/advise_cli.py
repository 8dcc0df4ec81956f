"""``lbo advise``: the command line of the critical-batch advisor (:mod:`lightning_lbo.critical_batch`).

Kept apart from the advisor so that building the parser (``lbo advise --help``) imports neither torch nor
Lightning: the advisor is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

SCALINGS = ("linear", "sqrt")
#: Monitored validation metric -> the direction in which it reaches its target.
MONITORS = {"val_acc": "max", "val_loss": "min"}


def _run(args: argparse.Namespace) -> int:
    import torch

    from lightning_lbo.critical_batch import advise, plot_b_simple

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        advice = advise(args.model, args.batch_size, args.lr, args.steps, args.scaling, args.max_batch,
                        args.probe_every, args.beta, args.seed, args.train_subset or None, args.data_dir,
                        args.accelerator, args.target, args.monitor, args.window, args.val_every, args.val_size)
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
                       description="Train on Fashion-MNIST until a validation target (or for a step budget), "
                                   "estimate the gradient noise scale B_simple (McCandlish et al. 2018) along the "
                                   "way, and print the critical batch measured over the last steps (near the "
                                   "target), where in training that estimate holds, the B_simple trace, a "
                                   "recommended batch and LR; optionally plot B_simple over the run. B_simple grows "
                                   "as the loss falls: give the target you train to (--target), or the estimate is "
                                   "that of the budget's end.")
    p.add_argument("--model", default="mlp-bn", help="reference model: cnn, mlp-bn, mlp, resnet, resnet8")
    p.add_argument("--batch-size", type=int, default=128, help="batch of the advisor's run (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="momentum-SGD LR of the advisor's run (default 0.1)")
    p.add_argument("--steps", type=int, default=300,
                   help="step budget: the run's length without --target, its cap with one (default 300)")
    p.add_argument("--target", type=float, default=None,
                   help="stop when the validated --monitor reaches this (e.g. 0.85 for val_acc); the estimate is "
                        "then the critical batch for training to it")
    p.add_argument("--monitor", default="val_acc", choices=tuple(MONITORS),
                   help="validated metric of --target: val_acc (reached from below) or val_loss (from above)")
    p.add_argument("--window", type=int, default=100,
                   help="estimate from the last N optimizer steps of the run (default 100)")
    p.add_argument("--val-every", type=int, default=50, help="validate every N steps with --target (default 50)")
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for validation with --target (default 5000)")
    p.add_argument("--scaling", default="linear", choices=SCALINGS, help="LR rule for the recommended batch")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the recommended batch")
    p.add_argument("--probe-every", type=int, default=5, help="estimate every N steps (default 5)")
    p.add_argument("--beta", type=float, default=0.9,
                   help="EMA decay of the plotted estimate per estimate (default 0.9)")
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 60000)")
    p.add_argument("--data-dir", default=None, help="where to look for Fashion-MNIST first (see lbo data)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and the held-out split")
    p.add_argument("--plot", default=None, help="write a PNG of B_simple over the run here")
    p.add_argument("--json", default=None, help="write the advice (with the whole B_simple trace) as JSON here")
    p.set_defaults(func=_run)
