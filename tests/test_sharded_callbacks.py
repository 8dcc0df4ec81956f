"""The callbacks under sharded data parallel (Lightning's ModelParallelStrategy, ``fully_shard`` / FSDP2).

LRSchedule, BatchNormStats, NonFiniteBatchGuard, AdaptiveBatchSize (ramp rule or measure_fn) and
AdversarialTraining work there: 2 sharded ranks equal a one-process loop over the same global batch
(tests/scripts/sharded_callbacks.py). HessianSpectrum, GradientNoiseScale and AdaptiveBatchSize's built-in
measurements refuse at setup, naming ``strategy='ddp'``; the pure helpers they use refuse DTensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_lbo.batch_rules import RampRule
from lightning_lbo.callbacks import AdaptiveBatchSize, GradientNoiseScale, HessianSpectrum
from lightning_lbo.callbacks._sharded import parameter_sharding
from tests.helpers.ddp import REPO_ROOT, run_script, spawn_gloo

REFUSED = [
    ("HessianSpectrum", lambda: HessianSpectrum(plot=False)),
    ("GradientNoiseScale", lambda: GradientNoiseScale()),
    (r"AdaptiveBatchSize\(rule='hessian'\)", lambda: AdaptiveBatchSize()),
    (r"AdaptiveBatchSize\(rule='noise_scale'\)", lambda: AdaptiveBatchSize(rule="noise_scale")),
]


def _model_parallel_trainer(pl, callbacks):
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def _module(pl):
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

    return Net()


@pytest.mark.parametrize(("name", "make"), REFUSED, ids=[r[0].replace("\\", "") for r in REFUSED])
def test_sharded_callbacks_setup_refuses_model_parallel_strategy(pl_package, name, make):
    """Under ModelParallelStrategy the callback stops at setup, naming the limitation and strategy='ddp'."""
    callback = make()
    trainer = _model_parallel_trainer(pl_package, [callback])
    with pytest.raises(ValueError, match=rf"^{name} does not support sharded parameters \(ModelParallelStrategy\):"
                                         r".*Instead, use strategy='ddp'"):
        callback.setup(trainer, _module(pl_package), "fit")


@pytest.mark.parametrize("make", [lambda: AdaptiveBatchSize(rule=RampRule({0: 1, 2: 2})),
                                  lambda: AdaptiveBatchSize(measure_fn=lambda trainer, module: 1.0)],
                         ids=["ramp", "measure_fn"])
def test_sharded_callbacks_adaptive_batch_size_without_builtin_measurement_accepts_sharding(pl_package, make):
    """A ramp or a user measurement needs no gradient of the parameters: no refusal."""
    callback = make()
    callback.setup(_model_parallel_trainer(pl_package, [callback]), _module(pl_package), "fit")


def test_sharded_callbacks_refusal_names_strategy_ddp_on_ddp_it_passes(pl_package):
    """The same callbacks set up under DDP (the alternative the message names) without complaint."""
    for _, make in REFUSED:
        callback = make()
        trainer = pl_package.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback])
        if isinstance(callback, AdaptiveBatchSize) and callback.rule.needs == "b_simple":
            trainer.callbacks.append(GradientNoiseScale())
        callback.setup(trainer, _module(pl_package), "fit")
        assert parameter_sharding(trainer) is None


def test_sharded_callbacks_parameter_sharding_knows_fsdp1_and_subclasses_by_name():
    """FSDPStrategy (GPU-only, so not run here) and subclasses of a sharding strategy are recognised by class name."""
    class FSDPStrategy:  # stands in for Lightning's (both packages' classes carry this name)
        pass

    class MyShardedStrategy(FSDPStrategy):
        pass

    assert parameter_sharding(SimpleNamespace(strategy=MyShardedStrategy())) == "FSDPStrategy"
    assert parameter_sharding(SimpleNamespace(strategy=object()), nn.Linear(2, 2)) is None


def _dtensor_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_lbo.callbacks._sharded import refuse_parameter_sharding
    from lightning_lbo.callbacks.nonfinite_batches import TensorSnapshot
    from lightning_lbo.hessian import HessianOperator
    from lightning_lbo.noise_scale import MicroBatchGradNorms, split_batch_sq_norms

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    assert all(type(p).__name__ == "DTensor" for p in params)
    batch = (torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))

    for build in (lambda: HessianOperator(model, [batch]), lambda: MicroBatchGradNorms(params),
                  lambda: split_batch_sq_norms(model, batch, params)):
        with pytest.raises(TypeError, match="does not work on sharded parameters"):
            build()
    # a strategy this package does not know, but DTensor parameters: refused on the parameters themselves
    trainer = SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match=r"^X does not support sharded parameters \(fully_shard \(DTensor"):
        refuse_parameter_sharding(trainer, model, "X", "why")

    # NonFiniteBatchGuard's snapshot saves and restores each rank's own shard of sharded parameters
    before = [p.detach().full_tensor().clone() for p in params]
    snapshot = TensorSnapshot(params)
    snapshot.save()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    snapshot.restore_where(torch.tensor(False))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach().full_tensor(), b + 1.0)
    snapshot.restore_where(torch.tensor(True))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach().full_tensor(), b)


def test_sharded_callbacks_pure_helpers_refuse_dtensors_and_snapshot_restores_shards():
    """2 gloo ranks, fully_shard: HVP/noise-scale helpers raise on DTensors; TensorSnapshot restores the shards."""
    spawn_gloo(_dtensor_worker, world_size=2)


@pytest.mark.slow
def test_sharded_callbacks_two_ranks_equal_one_process():
    """2 sharded ranks (torchrun, gloo) == a one-process loop: LR, weights, BN statistics, skips; refusals via fit."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "sharded_callbacks.py", torchrun_nproc=2, timeout=420).stdout
    assert "rank 0 ok" in out and "rank 1 ok" in out, out
