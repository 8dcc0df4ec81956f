"""LARS, LAMB and RMSpropWarmup under Lightning's ModelParallelStrategy (FSDP2, 2 CPU ranks, gloo) == one process.

The user writes ``fully_shard`` in ``configure_model`` and ``LARS(self.parameters(), ...)`` in
``configure_optimizers``, nothing else. After ``fit`` the whole parameters (gathered in ``on_train_end``)
must equal a plain single-process loop over the same global batches (float64, <= 1e-6 relative).
Then the same through Lightning's own (distributed) checkpoint: 3 steps, ``trainer.save_checkpoint``, a
new Trainer resumes with ``ckpt_path`` for 3 more (a second epoch over the same 3 batches) == 6 steps.
The module, Trainer and oracle are tests/helpers/sharded.py's. Run by tests/test_sharded_optim.py (popen
``ddp`` re-runs this script for rank 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed  # noqa: E402

from lightning_lbo import LAMB, LARS, RMSpropWarmup  # noqa: E402
from tests.helpers import sharded  # noqa: E402

STEPS, WORLD = 5, 2
FACTORIES = {
    "LARS": lambda params: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
    "LAMB": lambda params: LAMB(params, lr=0.02, weight_decay=0.01),
    "RMSpropWarmup": lambda params: RMSpropWarmup(params, lr=0.1, lr_rmsprop=1e-2, steps_per_epoch=2,
                                                  beta_center=1.0, beta_period=2.0),
}


def fit_and_check(name: str, directory: Path, resume: bool) -> None:
    """``resume=False``: one fit of ``STEPS`` steps. ``resume=True``: one epoch of 3 steps, save (the strategy's
    default distributed checkpoint), a new Trainer resumed for a second epoch. Either == one process."""
    def optimizer(module):
        return FACTORIES[name](module.parameters())

    if resume:
        first = sharded.model_parallel_trainer(WORLD, str(directory), max_epochs=1)  # checkpoint at an epoch end
        first.fit(sharded.sharded_net(optimizer, WORLD, 3))
        path = directory / f"{name}.ckpt"
        first.save_checkpoint(path)
        module = sharded.sharded_net(optimizer, WORLD, 3)
        trainer = sharded.model_parallel_trainer(WORLD, str(directory), max_epochs=2)
        trainer.fit(module, ckpt_path=path)
        steps, what = [0, 1, 2] * 2, f"{name}: Lightning checkpoint 3 + 3 steps == 6 uninterrupted steps"
        taken = getattr(trainer.optimizers[0], "steps_taken", 6)  # RMSpropWarmup's counter
        assert taken == 6, f"{name}: steps_taken after resume: {taken}"
    else:
        module = sharded.sharded_net(optimizer, WORLD, STEPS)
        trainer = sharded.model_parallel_trainer(WORLD, str(directory), max_steps=STEPS)
        trainer.fit(module)
        steps, what = list(range(STEPS)), f"{name}: sharded Lightning == one process over {STEPS} steps"
    reference = sharded.one_process_run(lambda model: FACTORIES[name](model.parameters()), steps, WORLD)
    sharded.check_equals_one_process(module, reference, what)
    if trainer.global_rank == 0:
        print(what)


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("sharded_ckpt")
    for name in FACTORIES:
        fit_and_check(name, directory, resume=False)
    if torch.distributed.get_rank() == 0:  # the group the fits initialised stays up between them
        print("sharded Lightning == one process")
    for name in FACTORIES:
        fit_and_check(name, directory, resume=True)


if __name__ == "__main__":
    main()
