"""LARS, LAMB and RMSpropWarmup under Lightning's ModelParallelStrategy (FSDP2, 2 CPU ranks, gloo) == one process.

The user writes ``fully_shard`` in ``configure_model`` and ``LARS(self.parameters(), ...)`` in
``configure_optimizers``, nothing else. After ``fit`` the whole parameters (gathered in ``on_train_end``)
must equal a plain single-process loop over the same global batches (float64, <= 1e-6 relative).
Then the same through Lightning's own (distributed) checkpoint: 3 steps, ``trainer.save_checkpoint``, a
new Trainer resumes with ``ckpt_path`` for 3 more (a second epoch over the same 3 batches) == 6 steps.
Run by tests/test_sharded_optim.py (popen ``ddp`` re-runs this script for rank 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_lbo import LAMB, LARS, RMSpropWarmup  # noqa: E402
from tests.helpers import sharded  # noqa: E402

STEPS, WORLD = 5, 2
FACTORIES = {
    "LARS": lambda params: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
    "LAMB": lambda params: LAMB(params, lr=0.02, weight_decay=0.01),
    "RMSpropWarmup": lambda params: RMSpropWarmup(params, lr=0.1, lr_rmsprop=1e-2, steps_per_epoch=2,
                                                  beta_center=1.0, beta_period=2.0),
}


class ShardedNet(pl.LightningModule):
    def __init__(self, optimizer: str, n_batches: int = STEPS) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.n_batches = n_batches
        self.net = sharded.make_mlp()
        self.final: list[torch.Tensor] = []

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return FACTORIES[self.optimizer_name](self.parameters())

    def train_dataloader(self) -> DataLoader:
        # this rank's contiguous share of each global batch, in order (no sampler: the split is explicit)
        shares = [sharded.rank_batch(step, self.global_rank, WORLD) for step in range(self.n_batches)]
        x, y = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        return DataLoader(TensorDataset(x, y), batch_size=shares[0][0].shape[0])

    def on_train_end(self) -> None:
        self.final = [sharded.full(p.detach()) for p in self.net.parameters()]  # a collective on every rank


def main() -> None:
    batches = [sharded.global_batch(step, WORLD) for step in range(STEPS)]
    for name, factory in FACTORIES.items():
        module = ShardedNet(name)
        trainer = pl.Trainer(accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False,
                             strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1))
        trainer.fit(module)
        ref = sharded.make_mlp()
        opt = factory(ref.parameters())
        for bx, by in batches:
            opt.zero_grad()
            F.cross_entropy(ref(bx), by).backward()
            opt.step()
        assert len(module.final) == len(list(ref.parameters()))
        for got, want in zip(module.final, ref.parameters(), strict=True):
            sharded.assert_close_relative(got, want.detach(), 1e-6, f"{name} under ModelParallelStrategy")
        moved = max((torch.linalg.vector_norm(w - w0) / torch.linalg.vector_norm(w0)).item()
                    for w, w0 in zip(ref.parameters(), sharded.make_mlp().parameters(), strict=True))
        assert moved > 1e-3, f"{name}: the weights barely moved ({moved:.1e}); the comparison would prove nothing"
        if trainer.global_rank == 0:
            print(f"{name}: sharded Lightning == one process over {STEPS} steps")
    if trainer.global_rank == 0:
        print("sharded Lightning == one process")
    resume_through_lightning_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("sharded_ckpt"))


def resume_through_lightning_checkpoint(directory: Path) -> None:
    """3 steps, save (ModelParallelStrategy's default distributed checkpoint), resume for 3 more == 6 steps."""
    def trainer(max_epochs: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=WORLD, max_epochs=max_epochs, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          use_distributed_sampler=False, default_root_dir=str(directory),
                          strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1))

    batches = [sharded.global_batch(step, WORLD) for step in range(3)] * 2  # two epochs of 3 batches
    for name, factory in FACTORIES.items():
        first = trainer(1)  # one epoch of 3 batches: the checkpoint is at an epoch boundary
        first.fit(ShardedNet(name, n_batches=3))
        path = directory / f"{name}.ckpt"
        first.save_checkpoint(path)
        module = ShardedNet(name, n_batches=3)
        resumed = trainer(2)
        resumed.fit(module, ckpt_path=path)
        optimizer = resumed.optimizers[0]
        if name == "RMSpropWarmup":
            assert optimizer.steps_taken == 6, f"steps_taken after resume: {optimizer.steps_taken}"
        ref = sharded.make_mlp()
        opt = factory(ref.parameters())
        for bx, by in batches:
            opt.zero_grad()
            F.cross_entropy(ref(bx), by).backward()
            opt.step()
        for got, want in zip(module.final, ref.parameters(), strict=True):
            sharded.assert_close_relative(got, want.detach(), 1e-6, f"{name} resumed from a Lightning checkpoint")
        if resumed.global_rank == 0:
            print(f"{name}: Lightning checkpoint 3 + 3 steps == 6 uninterrupted steps")


if __name__ == "__main__":
    main()
