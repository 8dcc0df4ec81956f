"""The 2-process test helpers themselves: gloo workers, ddp_spawn with asserts, popen-ddp scripts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_lbo.classifier import ClassifierModule, sgd_factory
from lightning_lbo.compat import callback_bases
from lightning_lbo.data import FashionMNISTDataModule
from tests.helpers.ddp import REPO_ROOT, run_script, spawn_gloo


def _allreduce_worker(rank: int, world_size: int, offset: float) -> None:
    t = torch.tensor([float(rank) + offset])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size)) + world_size * offset


def test_spawn_gloo_runs_collectives():
    """Two gloo ranks all-reduce a tensor."""
    spawn_gloo(_allreduce_worker, world_size=2, args=(0.5,))


class DisjointShardCheck(*callback_bases()):
    """Inside each ddp_spawn worker: the ranks' shards are disjoint and together cover the subset."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        labels = []
        for _, y in trainer.train_dataloader:
            labels.append(y)
        mine = torch.cat(labels)
        gathered = trainer.strategy.all_gather(torch.tensor(float(len(mine))))
        assert trainer.world_size == 2 and int(gathered.sum()) == 512, gathered


def test_ddp_spawn_shards_real_data():
    """ddp_spawn over 2 CPU processes shards the sliced-batch loader with a DistributedSampler."""
    import pytorch_lightning as pl

    module = ClassifierModule("mlp", optimizer=sgd_factory(lr=0.05), model_kwargs={"hidden": (16,)})
    dm = FashionMNISTDataModule(batch_size=64, train_subset=512)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[DisjointShardCheck()])
    trainer.fit(module, datamodule=dm)


def test_run_script_popen_ddp():
    """A popen-ddp script (re-run per rank by Lightning) succeeds and prints from both ranks."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "ddp_smoke.py", timeout=240).stdout
    assert "rank 0 ok" in out and "rank 1 ok" in out
