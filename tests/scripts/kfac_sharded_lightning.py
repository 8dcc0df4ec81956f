"""KFAC under Lightning's ModelParallelStrategy (fully_shard / FSDP2, 2 CPU ranks, gloo) == one process.

The user writes ``fully_shard`` in ``configure_model`` and ``KFAC(self, ...)`` in ``configure_optimizers``,
nothing else: no callback (K-FAC builds its curvature communicator on the parameters' mesh at bind, whose
process group carries the strategy's timeout). After ``fit`` the whole parameters must equal a plain
single-process loop over the same global batches (float64, <= 1e-6 relative). Then through Lightning's own
(distributed) checkpoint: 3 steps, ``trainer.save_checkpoint``, a new Trainer, this time with a user's
``KFACCallback()``, resumes with ``ckpt_path`` for 3 more == 6 uninterrupted steps, and K-FAC keeps the one
communicator it built (the callback adds none). The module, Trainer and oracle are tests/helpers/sharded.py's.
With ``--nodes 2`` under ``torchrun --nnodes 2`` (one rank per "node" on 127.0.0.1): the first fit only, with
``Trainer(num_nodes=2, devices=1)``. Run by tests/test_kfac_sharded_lightning.py.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_lbo import KFAC  # noqa: E402
from lightning_lbo.callbacks import KFACCallback  # noqa: E402
from tests.helpers import kfac_sharded as ks  # noqa: E402
from tests.helpers import sharded  # noqa: E402

STEPS, WORLD = 6, 2
TIMEOUT = timedelta(seconds=97)
BUILT: dict[str, object] = {}  # the communicator of the last KFAC built on the sharded module


def sharded_kfac(module) -> KFAC:
    opt = KFAC(module, **ks.KFAC_SETTINGS)
    BUILT["comm"] = opt.preconditioner.comm
    return opt


def one_process_kfac(model) -> KFAC:
    from lightning_lbo.optim.kfac.comm import Communicator

    opt = KFAC(model, **ks.KFAC_SETTINGS)
    opt.preconditioner.set_communicator(Communicator())  # one process inside a 2-rank group: on purpose
    return opt


def strategy() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, timeout=TIMEOUT)


def check_communicator(trainer, module) -> None:
    """One communicator, built at bind, synchronous, on the data-parallel mesh's group with the strategy's timeout."""
    comm = trainer.optimizers[0].preconditioner.comm
    assert comm is BUILT["comm"], "a second communicator replaced the one K-FAC built"
    assert comm.is_distributed and not comm.async_op and comm.world_size == WORLD
    group = module.device_mesh["data_parallel"].get_group()
    assert comm.group is group, (comm.group, group)
    timeout = group._get_backend(torch.device("cpu")).options._timeout  # gloo's options (private: test only)
    assert timeout == TIMEOUT, timeout


def main() -> None:
    args = sys.argv[1:]
    nodes = int(args[args.index("--nodes") + 1]) if "--nodes" in args else 1  # under torchrun: one rank per node
    directory = Path(args[0]) if args and not args[0].startswith("--") else Path("kfac_sharded_ckpt")
    module = sharded.sharded_net(sharded_kfac, WORLD, STEPS)
    fit = sharded.model_parallel_trainer(WORLD, str(directory), nodes=nodes, strategy=strategy(), max_steps=STEPS)
    fit.fit(module)
    check_communicator(fit, module)
    worst = sharded.check_equals_one_process(module, sharded.one_process_run(one_process_kfac, list(range(STEPS)),
                                                                             WORLD), "KFAC without a callback")
    print(f"rank {fit.global_rank} of {fit.world_size} on node {fit.node_rank}: equal to one process")
    if fit.global_rank == 0:
        print(f"sharded Lightning KFAC without KFACCallback == one process over {STEPS} steps "
              f"(worst relative error {worst:.1e})")
    if nodes > 1:
        return  # the multi-node launch checks the fit; the checkpoint round trip is the single-node run's

    first = sharded.model_parallel_trainer(WORLD, str(directory), strategy=strategy(), max_epochs=1)
    first.fit(sharded.sharded_net(sharded_kfac, WORLD, 3))
    path = directory / "kfac.ckpt"
    first.save_checkpoint(path)
    module = sharded.sharded_net(sharded_kfac, WORLD, 3)
    resumed = sharded.model_parallel_trainer(WORLD, str(directory), [KFACCallback()], strategy=strategy(),
                                             max_epochs=2)
    resumed.fit(module, ckpt_path=path)
    check_communicator(resumed, module)
    worst = sharded.check_equals_one_process(module, sharded.one_process_run(one_process_kfac, [0, 1, 2] * 2, WORLD),
                                             "KFAC resumed from a Lightning checkpoint")
    if resumed.global_rank == 0:
        print(f"Lightning checkpoint 3 + 3 steps (resumed with KFACCallback: one communicator) == 6 uninterrupted "
              f"steps (worst relative error {worst:.1e})")


if __name__ == "__main__":
    main()
