"""2 DDP ranks with NaN/Inf batches equal, bit for bit, the 2-rank run without those steps (run under torchrun).

Rank 0 gets a NaN batch at step 1, rank 1 an Inf batch at step 4 (and both a NaN at step 0 for SGD's
first step); SGD, LARS, LAMB run under ``ddp``, K-FAC under ``ddp_kfac``. Gradients are all-reduced, so
every step with a bad batch on *either* rank is skipped on both; the reference run drops those steps on
both ranks. Each rank compares its own weights, BN running statistics and optimizer state; prints
``rank R ok``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_lbo.strategies  # noqa: E402,F401  (registers "ddp_kfac")
from lightning_lbo.callbacks.nonfinite_batches import NonFiniteBatchGuard  # noqa: E402
from tests.test_nonfinite_batches import (  # noqa: E402
    NUM_BATCHES,
    OPTIMIZERS,
    assert_same_training_state,
    batches,
    module_class,
)

BAD_BY_RANK = {0: {0: float("nan"), 1: float("nan")}, 1: {0: float("nan"), 4: float("inf")}}


def fit(pl, name, data, callbacks=()):
    module = module_class(pl)(OPTIMIZERS[name])
    strategy = "ddp_kfac" if name == "kfac" else "ddp"  # K-FAC's factors are reduced across ranks there
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, log_every_n_steps=1, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return module, trainer


def main() -> None:
    torch.set_num_threads(1)
    pl = importlib.import_module("pytorch_lightning")
    rank = int(os.environ["RANK"])
    bad_steps = {i for bad in BAD_BY_RANK.values() for i in bad}
    data = batches(BAD_BY_RANK[rank], seed=rank)
    kept = [data[i] for i in range(NUM_BATCHES) if i not in bad_steps]
    for name in ("sgd", "lars", "lamb", "kfac"):
        guard = NonFiniteBatchGuard()
        bad_module, bad_trainer = fit(pl, name, data, callbacks=[guard])
        ref_module, ref_trainer = fit(pl, name, kept)
        assert_same_training_state(bad_module, ref_module, bad_trainer.optimizers[0], ref_trainer.optimizers[0])
        assert guard.total == len(bad_steps), (name, guard.total)
        flat = torch.cat([p.detach().reshape(-1) for p in bad_module.parameters()])
        gathered = bad_trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks diverged"
    print(f"rank {rank} ok", flush=True)
    if torch.distributed.is_initialized():  # leave together: a gloo group left to interpreter exit can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
