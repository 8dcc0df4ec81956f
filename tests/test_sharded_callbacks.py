"""The callbacks under sharded data parallel (Lightning's ModelParallelStrategy, ``fully_shard`` / FSDP2).

All seven work there: 2 sharded ranks equal a one-process loop over the same global batch
(tests/scripts/sharded_callbacks.py). HessianSpectrum and AdaptiveBatchSize's Hessian rule gather the full
parameters for the measurement; GradientNoiseScale reads per-micro-batch gradients of all ranks from
accumulation windows, so the noise-scale rule without accumulation refuses at setup. FSDPStrategy (FSDP1)
is refused by the three that differentiate or read per-rank gradients. Pure helpers refuse DTensors.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_lbo.batch_rules import RampRule
from lightning_lbo.callbacks import AdaptiveBatchSize, GradientNoiseScale, HessianSpectrum
from lightning_lbo.callbacks._sharded import data_parallel_size, parameter_sharding
from tests.helpers.ddp import REPO_ROOT, run_script, spawn_gloo

#: Refused under ModelParallelStrategy (fully_shard) at setup; everything else works there.
REFUSED = [(r"AdaptiveBatchSize\(rule='noise_scale'\)", lambda: AdaptiveBatchSize(rule="noise_scale"))]
#: Refused under FSDPStrategy (FSDP1 flat parameters; GPU-only, so checked with a stand-in class).
REFUSED_FSDP1 = [("HessianSpectrum", lambda: HessianSpectrum(plot=False)),
                 ("GradientNoiseScale", lambda: GradientNoiseScale()),
                 (r"AdaptiveBatchSize\(rule='hessian'\)", lambda: AdaptiveBatchSize())]


def _model_parallel_trainer(pl, callbacks, **kwargs):
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


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
                                  lambda: AdaptiveBatchSize(measure_fn=lambda trainer, module: 1.0),
                                  lambda: AdaptiveBatchSize(), lambda: HessianSpectrum(plot=False),
                                  lambda: GradientNoiseScale()],
                         ids=["ramp", "measure_fn", "hessian_rule", "hessian_spectrum", "noise_scale"])
def test_sharded_callbacks_setup_accepts_model_parallel_strategy(pl_package, make):
    """Ramps, user measurements, the Hessian (full parameters gathered) and the noise scale set up under fully_shard."""
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


@pytest.mark.parametrize(("name", "make"), REFUSED_FSDP1, ids=[r[0].replace("\\", "") for r in REFUSED_FSDP1])
def test_sharded_callbacks_setup_refuses_fsdp1(name, make):
    """Under FSDPStrategy (a stand-in: Lightning's runs on GPUs only) they stop at setup, naming the alternatives."""
    class FSDPStrategy:
        pass

    callback = make()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), precision_plugin=None, accumulate_grad_batches=1)
    module = SimpleNamespace(automatic_optimization=True)
    with pytest.raises(ValueError, match=rf"^{name} does not support FSDPStrategy \(FSDP1 flat parameters\):.*"
                                         r"Instead, use ModelParallelStrategy with fully_shard .*or strategy='ddp'"):
        if isinstance(callback, AdaptiveBatchSize):
            callback._refuse_sharded_measurement(trainer, None)  # the first check of its setup
        else:
            callback.setup(trainer, module, "fit")


def test_sharded_callbacks_noise_scale_rule_accepts_sharding_with_accumulation(pl_package):
    """The noise-scale rule under sharding needs GradientNoiseScale's accumulation windows from the first step."""
    callback = AdaptiveBatchSize(rule="noise_scale", mechanism="resize")
    trainer = _model_parallel_trainer(pl_package, [callback, GradientNoiseScale()], accumulate_grad_batches=2,
                                      reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False)
    callback.setup(trainer, _module(pl_package), "fit")


def test_sharded_callbacks_data_parallel_size_counts_sampler_replicas_not_ranks():
    """The global batch counts ranks that see different data: the sampler's replicas, else the world size."""
    class MeshNotBuilt:
        @property
        def distributed_sampler_kwargs(self):
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")

    tensor_parallel = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    assert data_parallel_size(SimpleNamespace(strategy=tensor_parallel, world_size=4)) == 2
    assert data_parallel_size(SimpleNamespace(strategy=object(), world_size=1)) == 1  # single device: no sampler
    assert data_parallel_size(SimpleNamespace(strategy=MeshNotBuilt(), world_size=4)) == 4


def _dtensor_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from lightning_lbo.callbacks._sharded import refuse_parameter_sharding
    from lightning_lbo.callbacks.nonfinite_batches import TensorSnapshot
    from lightning_lbo.hessian import HessianOperator
    from lightning_lbo.noise_scale import MicroBatchGradNorms, ShardedMicroBatchGradNorms, split_batch_sq_norms

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()  # 5 and 3 rows: uneven shards
    plain = copy.deepcopy(model)
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

    # inside fsdp_unsharded the operator takes the full parameters: == one process over every rank's batch
    from lightning_lbo._dtensor import fsdp_unsharded

    batches = [(torch.randn(4, 4, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64),
                torch.tensor([0, 1, 2, r])) for r in range(world_size)]
    with fsdp_unsharded(model) as full:
        assert not any(type(p).__name__ == "DTensor" for p in full)
        sharded_hessian = HessianOperator(model, [batches[rank]]).dense()
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # resharded on exit
    torch.testing.assert_close(sharded_hessian, HessianOperator(plain, batches, distributed=False).dense(),
                               rtol=1e-12, atol=1e-14)

    # per-micro-batch gradients of all ranks from the accumulated shards == brute force on the unsharded copy
    def reduce_sum(t):
        torch.distributed.all_reduce(t)
        return t

    gen = torch.Generator().manual_seed(1)
    data = [[(torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (3,), generator=gen))
             for _ in range(2)] for _ in range(world_size)]  # [rank][micro-batch]
    norms = ShardedMicroBatchGradNorms(params, world_size, reduce_sum)
    for _window in range(2):  # the second window must start from nothing again
        norms.start_window()
        for x, y in data[rank]:
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
            norms.after_backward()
        micro_sq, big_sq, count = norms.pop()
        for p in params:
            p.grad = None
    contributions = []
    for i in range(2):
        grads = [torch.autograd.grad(nn.functional.cross_entropy(plain(data[r][i][0]), data[r][i][1]) / 2,
                                     list(plain.parameters())) for r in range(world_size)]
        contributions.append(torch.cat([sum(g[j] for g in grads).reshape(-1) / world_size
                                        for j in range(len(params))]))
    assert count == 2
    torch.testing.assert_close(micro_sq, sum(c.pow(2).sum() for c in contributions), rtol=1e-12, atol=0)
    torch.testing.assert_close(big_sq, sum(contributions).pow(2).sum(), rtol=1e-12, atol=0)
    replicated = nn.Parameter(distribute_tensor(torch.zeros(2), mesh, [Replicate()]))
    with pytest.raises(ValueError, match="replicated pieces would be counted once per replica"):
        ShardedMicroBatchGradNorms([replicated], world_size, reduce_sum)

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


def test_sharded_callbacks_pure_helpers_on_dtensors():
    """2 gloo ranks, fully_shard: HVP/probe helpers raise; sharded micro-batch norms == brute force; snapshot."""
    spawn_gloo(_dtensor_worker, world_size=2)


@pytest.mark.slow
def test_sharded_callbacks_two_ranks_equal_one_process():
    """2 sharded ranks (torchrun, gloo) == a one-process loop: LR, weights, BN statistics, skips; refusals via fit."""
    out = run_script(REPO_ROOT / "tests" / "scripts" / "sharded_callbacks.py", torchrun_nproc=2, timeout=420).stdout
    assert "rank 0 ok" in out and "rank 1 ok" in out, out
