"""KFAC under Lightning's ModelParallelStrategy (fully_shard / FSDP2, 2 CPU ranks, gloo) == one process.

The user writes ``fully_shard`` in ``configure_model``, ``KFAC(self, ...)`` in ``configure_optimizers`` and
passes ``callbacks=[KFACCallback()]`` (which injects the curvature communicator). After ``fit`` the whole
parameters must equal a plain single-process loop over the same global batches (float64, <= 1e-6 relative).
Then through Lightning's own (distributed) checkpoint: 3 steps, ``trainer.save_checkpoint``, a new Trainer
resumes with ``ckpt_path`` for 3 more == 6 uninterrupted steps. Finally, without the callback the run
fails at the first step with an error naming it. Run by tests/test_kfac_sharded_lightning.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_lbo import KFAC  # noqa: E402
from lightning_lbo.callbacks import KFACCallback  # noqa: E402
from tests.helpers import kfac_sharded as ks  # noqa: E402

STEPS, WORLD = 6, 2


class ShardedNet(pl.LightningModule):
    def __init__(self, n_batches: int = STEPS) -> None:
        super().__init__()
        self.n_batches = n_batches
        self.net = ks.make_mlp()
        self.final: list[torch.Tensor] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return KFAC(self, **ks.KFAC_SETTINGS)

    def train_dataloader(self) -> DataLoader:
        shares = [ks.part(ks.global_batch("mlp", step), self.global_rank, WORLD) for step in range(self.n_batches)]
        x, y = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        return DataLoader(TensorDataset(x, y), batch_size=shares[0][0].shape[0])

    def on_train_end(self) -> None:
        self.final = [ks.full(p.detach()) for p in self.net.parameters()]  # a collective on every rank


def trainer(directory: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=WORLD, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      default_root_dir=str(directory), callbacks=callbacks,
                      strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1), **kwargs)


def reference(batches: list) -> torch.nn.Module:
    from lightning_lbo.optim.kfac.comm import Communicator

    model = ks.make_mlp()
    opt = KFAC(model, **ks.KFAC_SETTINGS)
    opt.preconditioner.set_communicator(Communicator())  # one process inside a 2-rank group: on purpose
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def check(module: ShardedNet, ref: torch.nn.Module, what: str) -> float:
    worst = 0.0
    assert len(module.final) == len(list(ref.parameters()))
    for got, want in zip(module.final, ref.parameters(), strict=True):
        worst = max(worst, ks.relative_error(got, want.detach()))
    assert worst <= 1e-6, f"{what}: relative error {worst:.2e}"
    return worst


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kfac_sharded_ckpt")
    batches = [ks.global_batch("mlp", step) for step in range(STEPS)]
    module = ShardedNet()
    fit = trainer(directory, [KFACCallback()], max_steps=STEPS)
    fit.fit(module)
    worst = check(module, reference(batches), "KFAC under ModelParallelStrategy")
    if fit.global_rank == 0:
        print(f"sharded Lightning KFAC == one process over {STEPS} steps (worst relative error {worst:.1e})")

    first = trainer(directory, [KFACCallback()], max_epochs=1)
    first.fit(ShardedNet(n_batches=3))
    path = directory / "kfac.ckpt"
    first.save_checkpoint(path)
    module = ShardedNet(n_batches=3)
    resumed = trainer(directory, [KFACCallback()], max_epochs=2)
    resumed.fit(module, ckpt_path=path)
    worst = check(module, reference(batches[:3] * 2), "KFAC resumed from a Lightning checkpoint")
    if resumed.global_rank == 0:
        print(f"Lightning checkpoint 3 + 3 steps == 6 uninterrupted steps (worst relative error {worst:.1e})")

    try:
        trainer(directory, [], max_steps=1).fit(ShardedNet(n_batches=1))
    except RuntimeError as error:
        assert "KFACCallback" in str(error), error
        if resumed.global_rank == 0:
            print("without KFACCallback: refused, naming it")
    else:
        raise AssertionError("KFAC without KFACCallback under ModelParallelStrategy trained")


if __name__ == "__main__":
    main()
