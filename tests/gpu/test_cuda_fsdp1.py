"""FSDP1 (Lightning's ``FSDPStrategy``, GPUs only): K-FAC and LARS refuse it at setup, naming ``fully_shard``.

Under FSDP1 each rank's parameters are flattened 1-D pieces of the original tensors (with or without
``use_orig_params=True``): no Kronecker factor matches them and per-tensor trust ratios would be per piece.
The refusal is a ``ValueError`` raised from ``configure_optimizers`` during ``Trainer.fit``'s setup, before
any step. On CUDA through Lightning's ``FSDPStrategy`` (one GPU); with ``LBO_GPU_TEST_DEVICE=cpu`` (the
check's smoke run) through torch's ``FullyShardedDataParallel`` on the CPU in a one-rank gloo group, since
Lightning refuses ``FSDPStrategy`` without an accelerator.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lbo import KFAC, LARS

OPTIMIZERS = {"KFAC": lambda module: KFAC(module, lr=0.05, damping=1e-2),
              "LARS": lambda module: LARS(module.parameters(), lr=0.5, momentum=0.9)}
MESSAGES = {"KFAC": r"K-FAC cannot run on FSDP1 parameters .* fully_shard", "LARS": r"FSDP1 parameters .* fully_shard"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _lightning_fit(name: str, use_orig_params: bool, tmp_path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return OPTIMIZERS[name](self)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
            return torch.utils.data.DataLoader(data, batch_size=4)

    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(use_orig_params=use_orig_params),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Net())


def _torch_fsdp1(name: str, use_orig_params: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    started = not dist.is_initialized()
    if started:  # one rank: FSDP1 needs a process group
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(_net(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        OPTIMIZERS[name](model)
    finally:
        if started:
            dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_fsdp1_refused_at_setup_naming_fully_shard(device, name, use_orig_params, tmp_path):
    with pytest.raises(ValueError, match=MESSAGES[name]):
        if device.type == "cuda":
            _lightning_fit(name, use_orig_params, tmp_path)
        else:
            _torch_fsdp1(name, use_orig_params)
