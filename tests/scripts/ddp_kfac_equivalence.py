"""2-rank K-FAC training equals 1-process K-FAC at the same global batch (run under torchrun).

Each rank trains a tiny MLP (no BN) on its half of every global batch of ``B`` examples with a
non-shuffling per-rank sampler (``use_distributed_sampler=False``); a plain single-process torch loop
with batch ``B`` and the same K-FAC settings is the oracle. Configurations share the two processes:

* ``ddp_kfac`` with grad_worker_fraction 1.0 and 1/world, with stale statistics, with gradient
  accumulation (micro-batches of B/4 under no_sync), a checkpoint/resume (rank 0 saves, both restore),
  and a DDP comm hook that must run on CPU/gloo;
* plain ``ddp`` (factors averaged by the synchronous fallback);
* a small CNN under both ``ddp_kfac`` settings and plain ``ddp``: weights bit-identical across ranks;
* a configuration that differs between ranks, which must fail on every rank with a clear message.

Usage: ``torchrun --nproc_per_node=2 ddp_kfac_equivalence.py [--package lightning.pytorch] [--nodes 2]
[--quick]``
(``--nodes 2``: one process per node, ``Trainer(num_nodes=2, devices=1)``). Prints ``rank R ok``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_lbo.callbacks.kfac import KFACCallback
from lightning_lbo.classifier import classifier_module_class
from lightning_lbo.compat import lightning_package
from lightning_lbo.optim.kfac import KFAC, Communicator, StaleStatistics
from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

B, STEPS_PER_EPOCH, EPOCHS, IN, CLASSES = 16, 3, 2, 12, 3
DATA = torch.Generator().manual_seed(0)
X = torch.randn(B * STEPS_PER_EPOCH, IN, generator=DATA)
Y = torch.randint(0, CLASSES, (B * STEPS_PER_EPOCH,), generator=DATA)
BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, damping=1e-2, factor_update_interval=1,
            inverse_update_interval=1)
STALE = dict(stale_statistics=StaleStatistics(threshold=0.3, growth=2.0), inverse_update_interval=2)


class RankSlices(Sampler):
    """Global batch ``s`` is ``X[s*B:(s+1)*B]``; rank ``r``'s micro-batch ``m`` is its ``r``-th, ``m``-th slice."""

    def __init__(self, rank: int, world_size: int, micro_batches: int) -> None:
        self.rank, self.world_size, self.micro = rank, world_size, micro_batches

    def __iter__(self):
        size = B // (self.world_size * self.micro)
        for step in range(STEPS_PER_EPOCH):
            for m in range(self.micro):
                start = step * B + (m * self.world_size + self.rank) * size
                yield from range(start, start + size)

    def __len__(self) -> int:
        return B * STEPS_PER_EPOCH // self.world_size


def make_module(package: str, kfac_kwargs: dict):
    torch.manual_seed(1)
    kwargs = {**BASE, **kfac_kwargs}
    return classifier_module_class(package)(
        "mlp", optimizer=lambda m: KFAC(m, **kwargs), num_classes=CLASSES,
        model_kwargs={"in_features": IN, "hidden": (8,)})


def reference(package: str, kfac_kwargs: dict, steps: int) -> list[torch.Tensor]:
    """One process, batch B, plain torch loop: the oracle."""
    module = make_module(package, kfac_kwargs)
    opt = module.configure_optimizers()
    opt.preconditioner.set_communicator(Communicator())  # every rank computes the one-process oracle alone
    module.train()
    for step in range(steps):
        s = step % STEPS_PER_EPOCH
        opt.zero_grad()
        F.cross_entropy(module(X[s * B:(s + 1) * B]), Y[s * B:(s + 1) * B]).backward()
        opt.step()
    return [p.detach().clone() for p in module.parameters()]


COUNTED = {"calls": 0}


def counting_allreduce_hook(state, bucket):
    COUNTED["calls"] += 1
    return default_hooks.allreduce_hook(state, bucket)


def _kfac_callbacks(strategy):
    """Plain ddp needs the user's KFACCallback (it injects the curvature communicator); ddp_kfac adds its own."""
    return [KFACCallback()] if strategy == "ddp" else []


def train(pl, args, strategy, kfac_kwargs, epochs=EPOCHS, accumulate=1, ckpt_path=None):
    module = make_module(args.package, kfac_kwargs)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])  # set by torchrun
    loader = DataLoader(TensorDataset(X, Y), batch_size=B // (world * accumulate),
                        sampler=RankSlices(rank, world, accumulate))
    trainer = pl.Trainer(accelerator="cpu", devices=world // args.nodes, num_nodes=args.nodes, strategy=strategy,
                         max_epochs=epochs, accumulate_grad_batches=accumulate, use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=_kfac_callbacks(strategy))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, module


IMAGES = torch.randn(B * STEPS_PER_EPOCH, 1, 6, 6, generator=DATA)


def train_conv(pl, args, strategy):
    """A small CNN (conv weights are where ranks drifted apart by 1 ulp in K-FAC v1)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 2, CLASSES))
    module = classifier_module_class(args.package)(net, optimizer=lambda m: KFAC(m, **BASE), num_classes=CLASSES)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    loader = DataLoader(TensorDataset(IMAGES, Y), batch_size=B // world, sampler=RankSlices(rank, world, 1))
    trainer = pl.Trainer(accelerator="cpu", devices=world // args.nodes, num_nodes=args.nodes, strategy=strategy,
                         max_epochs=EPOCHS, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=_kfac_callbacks(strategy))
    trainer.fit(module, train_dataloaders=loader)
    return trainer, module


def check_ranks_identical(name, module, trainer):
    """Data-parallel ranks hold bit-identical weights (gathered and compared exactly)."""
    for pname, p in module.named_parameters():
        gathered = trainer.strategy.all_gather(p.detach())
        assert torch.equal(gathered[0], gathered[1]), f"{name}: {pname} differs across ranks"
    if trainer.global_rank == 0:
        print(f"{name}: ranks bit-identical", flush=True)


def check(name, module, expected, trainer):
    got = [p.detach() for p in module.parameters()]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    flat = torch.cat([p.flatten() for p in got])
    gathered = trainer.strategy.all_gather(flat)
    assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks diverged"
    if trainer.global_rank == 0:
        print(f"{name}: equal to 1 process", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default="pytorch_lightning")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only the default ddp_kfac configuration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl = lightning_package(args.package)
    Strategy = kfac_ddp_strategy_class(args.package)
    full = reference(args.package, {}, EPOCHS * STEPS_PER_EPOCH)


    trainer, module = train(pl, args, Strategy(ddp_comm_hook=counting_allreduce_hook), {})
    check("ddp_kfac", module, full, trainer)
    assert COUNTED["calls"] > 0, "the DDP comm hook was not registered on CPU"
    comm = trainer.strategy.communicator
    assert comm is not None and comm.stats.factor_bytes > 0, "no factor traffic under ddp_kfac"
    assert comm.stats.broadcast_bytes > 0 and not trainer.optimizers[0].preconditioner.precondition_on_owner_only
    # per step: one bucket of A factors launched after the forward, one of G factors completed at the step
    assert comm.stats.factor_reductions == 2 * EPOCHS * STEPS_PER_EPOCH, comm.stats
    if args.quick:
        print(f"rank {trainer.global_rank} ok", flush=True)
        return

    trainer, module = train(pl, args, Strategy(grad_worker_fraction=0.5, bucket_cap_mb=0.0), {})
    check("ddp_kfac grad_worker_fraction=1/2", module, full, trainer)
    assert trainer.optimizers[0].preconditioner.precondition_on_owner_only

    trainer, module = train(pl, args, "ddp_kfac", {}, accumulate=2)
    check("ddp_kfac accumulate_grad_batches=2", module, full, trainer)

    trainer, module = train(pl, args, "ddp_kfac", STALE)
    check("ddp_kfac stale statistics", module, reference(args.package, STALE, EPOCHS * STEPS_PER_EPOCH), trainer)
    pre = trainer.optimizers[0].preconditioner
    refreshes = sum(v for st in pre.blocks for v in st.refreshes.values())
    assert refreshes < EPOCHS * STEPS_PER_EPOCH * 2 * len(pre.blocks), "stale statistics skipped no refresh"

    # checkpoint after epoch 1 (rank 0 writes), resume on both ranks, compare with the uninterrupted run
    path = os.path.join(tempfile.gettempdir(), f"ddp_kfac_{os.environ['MASTER_PORT']}.ckpt")
    trainer, module = train(pl, args, "ddp_kfac", {}, epochs=1)
    trainer.save_checkpoint(path)
    trainer, module = train(pl, args, "ddp_kfac", {}, ckpt_path=path)
    check("ddp_kfac resumed", module, full, trainer)
    if trainer.global_rank == 0:
        os.remove(path)

    # plain DDP: the synchronous fallback (installed by K-FAC at its first capture) averages the factors
    trainer, module = train(pl, args, "ddp", {})
    comm = trainer.optimizers[0].preconditioner.comm
    assert comm.is_distributed and not comm.async_op, f"plain ddp left K-FAC with {type(comm).__name__}"
    check("plain ddp", module, full, trainer)

    # conv weights: bit-identical on every rank after every step, for both grad-worker settings and plain ddp
    Strategy = kfac_ddp_strategy_class(args.package)
    for name, strategy in (("conv ddp_kfac", Strategy()),
                           ("conv ddp_kfac grad_worker_fraction=1/2", Strategy(grad_worker_fraction=0.5)),
                           ("conv plain ddp", "ddp")):
        trainer, module = train_conv(pl, args, strategy)
        check_ranks_identical(name, module, trainer)

    # a rank with other settings must fail on every rank with a message, not hang
    try:
        train(pl, args, "ddp_kfac", {"damping": 1e-2 if trainer.global_rank == 0 else 1e-3})
    except RuntimeError as err:
        assert "configured differently" in str(err) and "rank 1" in str(err), err
    else:
        raise AssertionError("a mismatched K-FAC configuration did not fail")

    # plain ddp without KFACCallback: K-FAC has no communicator; it must fail at its first step, naming the fix
    module = make_module(args.package, {})
    loader = DataLoader(TensorDataset(X, Y), batch_size=B // 2, sampler=RankSlices(trainer.global_rank, 2, 1))
    bare = pl.Trainer(accelerator="cpu", devices=2 // args.nodes, num_nodes=args.nodes, strategy="ddp", max_steps=1,
                      use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    try:
        bare.fit(module, train_dataloaders=loader)
    except RuntimeError as err:
        assert "KFACCallback()" in str(err) and "ddp_kfac" in str(err), err
        print("plain ddp without KFACCallback: fails naming it", flush=True)
    else:
        raise AssertionError("plain ddp without KFACCallback trained with per-rank curvature")
    print(f"rank {trainer.global_rank} ok", flush=True)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leave together: a gloo group left to interpreter exit can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
