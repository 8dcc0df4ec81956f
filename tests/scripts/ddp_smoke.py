"""Popen-DDP smoke script: Lightning re-runs this file for rank 1; each rank prints 'rank N ok'."""

import pytorch_lightning as pl
import torch

from lightning_lbo.classifier import ClassifierModule, sgd_factory
from lightning_lbo.data import FashionMNISTDataModule

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule("mlp", optimizer=sgd_factory(lr=0.05), model_kwargs={"hidden": (16,)})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=FashionMNISTDataModule(batch_size=32, train_subset=256))
    # Parameters must agree across ranks after DDP steps.
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = trainer.strategy.all_gather(flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    print(f"rank {trainer.global_rank} ok", flush=True)
    if torch.distributed.is_initialized():  # leave together: a gloo group left to interpreter exit can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
