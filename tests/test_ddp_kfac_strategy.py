"""KFACDDPStrategy: registration in both packages, and 2-process / 2-node training equal to 1 process."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import lightning_lbo
from lightning_lbo.classifier import ClassifierModule
from lightning_lbo.compat import callback_bases
from lightning_lbo.data import FashionMNISTDataModule
from lightning_lbo.strategies import register_strategies
from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class
from tests.helpers.ddp import REPO_ROOT, run_script

SCRIPTS = REPO_ROOT / "tests" / "scripts"


def test_ddp_kfac_registered_in_both_packages(pl_package, tmp_path):
    """`ddp_kfac` and `ddp_kfac_spawn` resolve to the package's own KFACDDPStrategy; registering again is a no-op."""
    register_strategies()  # idempotent: lightning_lbo's import already registered them
    lightning_lbo.strategies.register_strategies()
    cls = kfac_ddp_strategy_class(pl_package.__name__)
    assert issubclass(cls, pl_package.strategies.DDPStrategy)
    registry = pl_package.strategies.StrategyRegistry
    assert registry["ddp_kfac"]["strategy"] is cls and registry["ddp_kfac_spawn"]["strategy"] is cls
    assert registry["ddp_kfac_spawn"]["init_params"]["start_method"] == "spawn"
    trainer = pl_package.Trainer(strategy="ddp_kfac", accelerator="cpu", devices=2, logger=False,
                                 default_root_dir=str(tmp_path))
    assert type(trainer.strategy) is cls and trainer.strategy._start_method == "popen"
    strategy = cls(grad_worker_fraction=0.5, bucket_cap_mb=1.0, start_method="spawn")
    assert strategy.grad_worker_fraction == 0.5 and strategy._start_method == "spawn"


def test_ddp_kfac_rejects_bad_settings():
    """Invalid knobs fail at construction with the accepted values in the message."""
    cls = kfac_ddp_strategy_class()
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        cls(grad_worker_fraction=1.5)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        cls(bucket_cap_mb=-1)


@pytest.mark.parametrize("fraction", [0.3, 0.4, 0.0, -0.5, 1.5, float("nan"), float("inf"), True])
def test_ddp_kfac_grad_worker_fraction_rejected_at_construction(fraction):
    """A value that gives a whole number of grad workers for no world size fails at construction (0.3 was
    rounded to 1/2 at setup), naming the valid values."""
    with pytest.raises(ValueError, match=r"Invalid grad_worker_fraction: .*; use 1\.0 \(every rank preconditions "
                                         r"each layer\) or 1/world_size \(each layer's owner"):
        kfac_ddp_strategy_class()(grad_worker_fraction=fraction)


def test_kfac_grad_worker_fraction_one_rule_with_the_world_size():
    """The same rule at setup, with the world size: 1.0 or 1/world_size, else the valid value is named."""
    from lightning_lbo.optim.kfac.distributed import check_grad_worker_fraction

    assert check_grad_worker_fraction(1.0, 4) == 4 and check_grad_worker_fraction(0.25, 4) == 1
    assert check_grad_worker_fraction(1 / 3, 3) == 1 and check_grad_worker_fraction(1.0, 1) == 1
    assert check_grad_worker_fraction(0.5) is None  # constructor: valid for 2 ranks
    for fraction, world in ((0.5, 4), (0.5, 1), (0.25, 2), (1 / 3, 6)):
        with pytest.raises(ValueError, match=rf"Invalid grad_worker_fraction: .* with world size {world}; use 1\.0 "
                                             rf".* or 1/world_size = {1 / world:g} \(each layer's owner"):
            check_grad_worker_fraction(fraction, world)


def test_kfac_communicator_rejects_a_grad_worker_fraction_for_another_world_size(tmp_path):
    """TorchDistributedCommunicator (what ddp_kfac builds at setup) applies the rule: 0.5 on 1 rank is rejected
    (it was rounded to 1 grad worker without a word)."""
    from datetime import timedelta

    from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                                         timeout=timedelta(seconds=60))
    try:
        with pytest.raises(ValueError, match=r"grad_worker_fraction: 0.5 with world size 1; .* = 1 \("):
            TorchDistributedCommunicator(grad_worker_fraction=0.5)
        assert TorchDistributedCommunicator(grad_worker_fraction=1.0).grad_worker_fraction == 1.0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_kfac_two_ranks_match_one_process():
    """2 ranks x B/2 equal 1 process x B: ddp_kfac (both grad-worker settings, stale statistics,
    accumulation, resume, CPU comm hook), plain ddp with KFACCallback; conv weights bit-identical across ranks (both
    settings and plain ddp); a mismatched configuration fails on every rank; plain ddp without KFACCallback fails
    at the first step naming it."""
    out = run_script(SCRIPTS / "ddp_kfac_equivalence.py", torchrun_nproc=2, timeout=420).stdout
    assert "rank 0 ok" in out and "rank 1 ok" in out
    for name in ("ddp_kfac", "ddp_kfac grad_worker_fraction=1/2", "ddp_kfac stale statistics",
                 "ddp_kfac accumulate_grad_batches=2", "ddp_kfac resumed", "plain ddp"):
        assert f"{name}: equal to 1 process" in out, name
    for name in ("conv ddp_kfac", "conv ddp_kfac grad_worker_fraction=1/2", "conv plain ddp"):
        assert f"{name}: ranks bit-identical" in out, name
    assert "plain ddp without KFACCallback: fails naming it" in out


@pytest.mark.slow
def test_ddp_kfac_two_nodes_lightning_pytorch():
    """torchrun --nnodes 2 on 127.0.0.1 with Trainer(num_nodes=2, devices=1) (lightning.pytorch) trains and agrees."""
    out = run_script(SCRIPTS / "ddp_kfac_equivalence.py", "--quick", "--nodes", "2", "--package", "lightning.pytorch",
                     torchrun_nproc=1, nnodes=2, timeout=300).stdout
    assert "ddp_kfac: equal to 1 process" in out and "rank 0 ok" in out and "rank 1 ok" in out


def _kfac(module, **kwargs):
    from lightning_lbo.optim.kfac import KFAC

    return KFAC(module, lr=0.05, damping=1e-2, factor_update_interval=1, inverse_update_interval=1, **kwargs)


class _CurvatureAgrees(*callback_bases()):
    """Inside each ddp_kfac_spawn worker: the communicator is installed and every rank holds the same factors."""

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator

        pre = trainer.optimizers[0].preconditioner
        assert isinstance(pre.comm, TorchDistributedCommunicator) and pre.comm.world_size == 2
        flat = torch.cat([t.flatten() for block in pre.blocks for t in pre.factors(block.module).values()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "factors differ across ranks"


def test_ddp_kfac_spawn_shares_factors(tmp_path):
    """`ddp_kfac_spawn` (2 CPU workers, shuffled shards) installs the communicator; factors agree across ranks."""
    import pytorch_lightning as pl

    module = ClassifierModule("mlp", optimizer=partial(_kfac), model_kwargs={"hidden": (16,)})
    trainer = pl.Trainer(strategy="ddp_kfac_spawn", accelerator="cpu", devices=2, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[_CurvatureAgrees()], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=FashionMNISTDataModule(batch_size=32, train_subset=128))


@pytest.mark.slow
def test_ddp_kfac_curvature_collective_honours_the_strategy_timeout(tmp_path):
    """A frozen peer: the survivor's curvature all-reduce fails after the strategy's timeout (6 s, + 14 s margin),
    for ddp_kfac's group and for the communicator KFACCallback builds under plain DDPStrategy(timeout=...)."""
    import time

    start = time.monotonic()
    out = run_script(SCRIPTS / "kfac_timeout.py", "6", "14", str(tmp_path), timeout=240).stdout
    assert "ddp_kfac: timed out after" in out and "plain ddp: timed out after" in out, out
    assert "rank 0 ok" in out and "rank 1 ok" in out, out
    assert time.monotonic() - start < 150  # bounded: nothing waited for torch's 30-minute default
