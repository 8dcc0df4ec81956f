"""The callbacks under sharded data parallel (``ModelParallelStrategy``, ``fully_shard``), 2 ranks, vs one process.

Run under ``torchrun --nproc_per_node=2``. One sharded fit (float64, SGD with momentum) carries the
callbacks that work under sharding: ``LRSchedule`` (linear warmup, batch scaling), ``AdaptiveBatchSize``
(``RampRule``: accumulation x2 from epoch 1, LR following the batch), ``AdversarialTraining`` (FGSM on
half, then a quarter of each batch), ``BatchNormStats`` (last batch), ``GradientNoiseScale`` (from the
accumulation windows of epoch 1) and ``NonFiniteBatchGuard``, with two
bad steps: at step 1 rank 1's forward makes the gradient of one row of the first layer infinite (a row held
by rank 1's shard only: the loss stays finite, rank 0's shard is clean), at step 2 rank 0's batch gets a
NaN. The oracle is a plain one-process loop written here without Lightning over both ranks' batches
(each rank's chunk normalised with its own batch statistics and its own running statistics, as
data-parallel ranks do), the bad steps dropped: final weights, the LR of every step, the installed
BatchNorm statistics (and precise BN after the fit), the smoothed noise-scale terms and the skip count
must match on every rank.

Then the callbacks that cannot work under sharding must refuse at setup through ``Trainer.fit`` with a
message naming the alternative, and the pure helpers must refuse DTensor parameters. Last, with
``tensor_parallel_size=2`` (both ranks on one batch) the global batch of LRSchedule and AdaptiveBatchSize
counts data-parallel ranks only, and BatchNormStats refuses. Prints ``rank R ok``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_lbo.adversarial import fgsm  # noqa: E402
from lightning_lbo.batch_rules import RampRule  # noqa: E402
from lightning_lbo.callbacks import (  # noqa: E402
    AdaptiveBatchSize,
    AdversarialTraining,
    BatchNormStats,
    GradientNoiseScale,
    HessianSpectrum,
    LRSchedule,
    NonFiniteBatchGuard,
)
from lightning_lbo.hessian import HessianOperator, power_iteration, top_eigenvalues  # noqa: E402
from lightning_lbo.noise_scale import MicroBatchGradNorms  # noqa: E402

WORLD, PER_RANK_BATCH, BATCHES_PER_EPOCH, EPOCHS = 2, 8, 4, 2
BASE_LR, MOMENTUM, WARMUP_STEPS, REFERENCE_BATCH = 0.05, 0.9, 3, 8
RATIO, EPSILON, DATA_RANGE = 0.5, 0.05, (-3.0, 3.0)
POISON_STEP, NAN_STEP = {1: 1}, {0: 2}  # rank -> step of its bad batch (epoch 0, one batch per step)
BAD_STEPS = {1, 2}
NOISE_BETA = 0.5
TOL = 1e-10


class PoisonGrad(torch.autograd.Function):
    """Identity forward; backward makes the gradient of the last feature infinite (one row of the layer before)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, -1] = float("inf")
        return grad


class Poison(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, h):
        return PoisonGrad.apply(h) if self.active else h


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), Poison(), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def rank_data(rank: int) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + rank)
    n = PER_RANK_BATCH * BATCHES_PER_EPOCH
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def module_class(pl):
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_net()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.model[0], mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            step, rank = self.trainer.global_step, self.trainer.global_rank
            if NAN_STEP.get(rank) == step:
                x = x.clone()
                x[0, 0] = float("nan")
            self.model[1].active = POISON_STEP.get(rank) == step
            logits = self(x)
            self.model[1].active = False
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=BASE_LR, momentum=MOMENTUM)

    return Net


class LRRecorder:
    """The LR of every optimizer step (the LR the update is made with)."""

    def __init__(self, pl) -> None:
        self.lrs: list[float] = []

        class _Recorder(pl.Callback):
            def on_before_optimizer_step(inner, trainer, pl_module, optimizer):  # noqa: N805
                self.lrs.append(float(optimizer.param_groups[0]["lr"]))

        self.callback = _Recorder()


def trainer_for(pl, callbacks, data_parallel_size=WORLD, max_epochs=EPOCHS, **kwargs):
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=data_parallel_size,
                                                   tensor_parallel_size=WORLD // data_parallel_size)
    return pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=max_epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, num_sanity_val_steps=0, log_every_n_steps=1,
                      callbacks=callbacks, **kwargs)


# ---------------------------------------------------------------------------------------------- reference
def bn_buffers(net: nn.Sequential) -> list[torch.Tensor]:
    bn = net[2]
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def reference():
    """One process, no Lightning: the global batch of both ranks, bad steps dropped. Returns what to compare."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    data = [rank_data(r).tensors for r in range(WORLD)]
    running = [[b.clone() for b in bn_buffers(net)] for _ in range(WORLD)]  # each rank's own BN buffers
    lrs, last_inputs, step = [], None, 0
    noise_terms = []  # (|G|^2, tr Sigma) of each step with two batch sizes (accumulation windows)

    def flat_grad():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in net.parameters()])

    def use_buffers(rank):
        for buf, saved in zip(bn_buffers(net), running[rank], strict=True):
            buf.copy_(saved)

    def keep_buffers(rank):
        running[rank] = [b.clone() for b in bn_buffers(net)]

    for epoch in range(EPOCHS):
        factor = 1 if epoch == 0 else 2
        scale = PER_RANK_BATCH * WORLD * factor / REFERENCE_BATCH  # linear scaling rule
        n_adv = round(RATIO / factor * PER_RANK_BATCH)
        for first in range(0, BATCHES_PER_EPOCH, factor):
            warm = 0.5 + 0.5 * step / WARMUP_STEPS if step < WARMUP_STEPS else 1.0  # from 1/scale0 = 0.5 to 1
            lr = BASE_LR * scale * warm
            lrs.append(lr)
            if step not in BAD_STEPS:
                opt.zero_grad()
                inputs, micro_grads = [], []
                for b in range(first, first + factor):
                    before = flat_grad()
                    for rank in range(WORLD):
                        x, y = (t[b * PER_RANK_BATCH:(b + 1) * PER_RANK_BATCH].clone() for t in data[rank])
                        use_buffers(rank)
                        x[:n_adv] = fgsm(net, x[:n_adv], y[:n_adv], EPSILON, DATA_RANGE)
                        loss = nn.functional.cross_entropy(net(x), y) / (WORLD * factor)
                        keep_buffers(rank)
                        loss.backward()
                        with torch.no_grad():
                            inputs.append(net[0](x))
                    micro_grads.append((flat_grad() - before) * factor)  # the mean-loss gradient of both ranks' chunks
                if factor > 1:
                    small_sq = torch.stack([g.pow(2).sum() for g in micro_grads]).mean()
                    big_sq = torch.stack(micro_grads).mean(0).pow(2).sum()
                    b_small, b_big = PER_RANK_BATCH * WORLD, PER_RANK_BATCH * WORLD * factor
                    noise_terms.append(((b_big * big_sq - b_small * small_sq) / (b_big - b_small),
                                        (small_sq - big_sq) / (1 / b_small - 1 / b_big)))
                last_inputs = torch.cat(inputs[-WORLD:])  # the last micro-batch of both ranks
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
            step += 1
    params = {name: p.detach().clone() for name, p in net.named_parameters()}
    last = (last_inputs.mean(0), last_inputs.var(0, unbiased=True))
    with torch.no_grad():  # precise BN over the first 2 batches per rank, final weights
        h = torch.cat([net[0](d[0][:2 * PER_RANK_BATCH]) for d in data])
    precise = (h.mean(0), h.var(0, unbiased=True))
    # the Hessian at the end (eval-mode BN with rank 0's running statistics) over each rank's first batch, exactly
    use_buffers(0)
    first_batches = [tuple(t[:PER_RANK_BATCH] for t in d) for d in data]
    operator = HessianOperator(net, first_batches, distributed=False)
    lanczos = torch.tensor(top_eigenvalues(operator, 2, "lanczos", 83, 1e-3, 0).eigenvalues)  # the callback's defaults
    exact = torch.linalg.eigvalsh(operator.dense())[-2:].flip(0)
    top = (lanczos, exact)
    ema, weight = torch.zeros(2, dtype=torch.float64), 0.0  # McCandlish's smoothed terms, bias-corrected
    for terms in noise_terms:
        ema = NOISE_BETA * ema + (1 - NOISE_BETA) * torch.stack(terms)
        weight = NOISE_BETA * weight + (1 - NOISE_BETA)
    return params, lrs, last, precise, (ema / weight, len(noise_terms)), top


# ---------------------------------------------------------------------------------------------- checks
WORST = {"error": 0.0}


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err <= TOL, f"{name}: relative error {err:.3e} > {TOL}"
    WORST["error"] = max(WORST["error"], err)


def check_working_callbacks(pl, rank: int) -> None:
    recorder = LRRecorder(pl)
    guard = NonFiniteBatchGuard()
    bn_stats = BatchNormStats()
    noise = GradientNoiseScale(beta=NOISE_BETA, log_every_n_steps=1)
    # before AdversarialTraining, which perturbs the batch in place; Lanczos over all 83 parameters: exact
    spectrum = HessianSpectrum(top_k=2, max_iters=83, trace_samples=0, density_probes=0, plot=False)
    callbacks = [spectrum, noise, LRSchedule(warmup_steps=WARMUP_STEPS, reference_batch_size=REFERENCE_BATCH),
                 AdaptiveBatchSize(rule=RampRule({0: 1, 1: 2}), max_factor=4),
                 AdversarialTraining(ratio=RATIO, epsilon=EPSILON, stop_fraction=1.0, data_range=DATA_RANGE),
                 bn_stats, guard, recorder.callback]
    module = module_class(pl)()
    trainer = trainer_for(pl, callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(rank_data(rank), batch_size=PER_RANK_BATCH))
    want_params, want_lrs, want_last, want_precise, (want_noise, noise_updates), want_eigs = reference()

    assert trainer.global_step == len(want_lrs), (trainer.global_step, len(want_lrs))
    assert len(recorder.lrs) == len(want_lrs), (recorder.lrs, want_lrs)
    for step, (got, want) in enumerate(zip(recorder.lrs, want_lrs, strict=True)):
        assert abs(got - want) <= 1e-15 * want, f"LR of step {step}: {got} != {want}"
    for name, p in module.model.named_parameters():
        assert type(p).__name__ == "DTensor", f"{name} is not sharded: {type(p).__name__}"
        close(f"parameter {name}", p.detach().full_tensor(), want_params[name])
    assert noise_updates == 2 and noise.estimator.updates == noise_updates, (noise.estimator.updates, noise_updates)
    close("noise scale |G|^2", noise.estimator.grad_sq(), want_noise[0])
    close("noise scale tr(Sigma)", noise.estimator.trace(), want_noise[1])
    got_eigs = torch.tensor(spectrum.last["all"]["eigenvalues"])
    close("HessianSpectrum top-2 eigenvalues (Lanczos on one process)", got_eigs, want_eigs[0])
    exact_err = ((got_eigs - want_eigs[1]).abs() / want_eigs[1].abs()).max().item()
    assert exact_err <= 1e-6, f"HessianSpectrum top-2 eigenvalues vs the dense Hessian: {exact_err:.1e}"
    assert guard.total == len(BAD_STEPS), f"rank {rank} counted {guard.total} skipped steps, not {len(BAD_STEPS)}"
    bn = module.model[2]
    close("BatchNormStats running_mean", bn.running_mean, want_last[0])
    close("BatchNormStats running_var", bn.running_var, want_last[1])

    precise = BatchNormStats(mode="precise", num_batches=2)
    stats = precise.refresh(trainer, module)  # a collective: every rank runs it
    assert stats is not None and stats.num_samples == 2 * PER_RANK_BATCH * WORLD, stats
    close("precise running_mean", bn.running_mean, want_precise[0])
    close("precise running_var", bn.running_var, want_precise[1])

    # every rank holds the same BN buffers (they are not sharded, and no strategy broadcasts them)
    buffers = torch.cat([bn.running_mean, bn.running_var])
    gathered = [torch.empty_like(buffers) for _ in range(WORLD)]
    torch.distributed.all_gather(gathered, buffers)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "BatchNorm buffers differ across ranks"

    # the pure helpers refuse DTensor parameters instead of measuring nothing
    params = list(module.parameters())
    for build in (lambda: HessianOperator(module, [(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2).long())]),
                  lambda: MicroBatchGradNorms(params)):
        try:
            build()
        except TypeError as err:
            assert "sharded parameters" in str(err), err
        else:
            raise AssertionError("a pure helper accepted DTensor parameters")


def check_hessian_rule(pl, rank: int) -> None:
    """AdaptiveBatchSize(rule='hessian') after one step: its power iteration == the same on an unsharded model."""
    adaptive = AdaptiveBatchSize(power_iters=6, tol=1e-12, scale_lr=False)  # one step at a constant LR
    trainer = trainer_for(pl, [adaptive], max_epochs=1, limit_train_batches=1)
    trainer.fit(module_class(pl)(), train_dataloaders=DataLoader(rank_data(rank), batch_size=PER_RANK_BATCH))
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    first_batches = [tuple(t[:PER_RANK_BATCH] for t in rank_data(r).tensors) for r in range(WORLD)]
    running = None
    for r, (x, y) in enumerate(first_batches):
        (nn.functional.cross_entropy(net(x), y) / WORLD).backward()
        if r == 0:  # the measurement sees rank 0's BN statistics (broadcast, as under DDP): after its own batch
            running = [b.clone() for b in bn_buffers(net)]
    opt.step()
    for buf, saved in zip(bn_buffers(net), running, strict=True):
        buf.copy_(saved)
    want = power_iteration(HessianOperator(net, first_batches, distributed=False), k=1, max_iters=6, tol=1e-12)
    close("AdaptiveBatchSize Hessian eigenvalue", torch.tensor(adaptive.history[0]["measurement"]),
          torch.tensor(want.eigenvalues[0]))


def check_refusals(pl, rank: int) -> None:
    """Each callback that cannot work on sharded parameters stops Trainer.fit at setup, naming strategy='ddp'."""
    cases = [("AdaptiveBatchSize(rule='noise_scale')", [AdaptiveBatchSize(rule="noise_scale")])]
    for name, callbacks in cases:
        trainer = trainer_for(pl, callbacks, max_steps=1)
        try:
            trainer.fit(module_class(pl)(), train_dataloaders=DataLoader(rank_data(rank), batch_size=PER_RANK_BATCH))
        except ValueError as err:
            message = str(err)
            assert message.startswith(f"{name} does not support sharded parameters (ModelParallelStrategy)"), message
            assert "strategy='ddp'" in message, message
        else:
            raise AssertionError(f"{name} trained on sharded parameters")
        assert trainer.global_step == 0, name


def check_tensor_parallel(pl, rank: int) -> None:
    """tensor_parallel_size=2: both ranks share each batch, so the global batch is the per-device batch."""
    recorder = LRRecorder(pl)
    lr_schedule = LRSchedule(reference_batch_size=REFERENCE_BATCH)
    adaptive = AdaptiveBatchSize(rule=RampRule({0: 1}))
    trainer = trainer_for(pl, [lr_schedule, adaptive, recorder.callback], data_parallel_size=1, max_steps=1)
    trainer.fit(module_class(pl)(), train_dataloaders=DataLoader(rank_data(0), batch_size=PER_RANK_BATCH))
    assert lr_schedule.global_batch_size == PER_RANK_BATCH, lr_schedule.global_batch_size
    assert adaptive.global_batch(trainer) == PER_RANK_BATCH, adaptive.global_batch(trainer)
    assert recorder.lrs == [BASE_LR * PER_RANK_BATCH / REFERENCE_BATCH], recorder.lrs
    trainer = trainer_for(pl, [BatchNormStats()], data_parallel_size=1, max_steps=1)
    try:
        trainer.fit(module_class(pl)(), train_dataloaders=DataLoader(rank_data(0), batch_size=PER_RANK_BATCH))
    except ValueError as err:
        assert "runs 2 ranks on 1 data-parallel replicas" in str(err), err
    else:
        raise AssertionError("BatchNormStats pooled duplicate batches under tensor parallelism")


def main() -> None:
    torch.set_num_threads(1)
    pl = importlib.import_module(sys.argv[1] if len(sys.argv) > 1 else "pytorch_lightning")
    rank = int(os.environ["RANK"])
    check_working_callbacks(pl, rank)
    check_hessian_rule(pl, rank)
    check_refusals(pl, rank)
    check_tensor_parallel(pl, rank)
    print(f"rank {rank} ok (largest relative error against one process: {WORST['error']:.1e})", flush=True)
    if torch.distributed.is_initialized():  # leave together: a gloo group left to interpreter exit can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
