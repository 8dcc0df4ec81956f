"""Gradient noise scale: unbiased estimator on synthetic gradients, hooks under DDP, the Lightning callback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale
from lightning_lbo.capture import curvature_capture_paused
from lightning_lbo.noise_scale import MicroBatchGradNorms, NoiseScaleEstimator, noise_scale_terms
from tests.conftest import make_trainer
from tests.helpers.ddp import spawn_gloo

DIM = 40
SIGMA = 1.0  # per-coordinate std of the per-sample gradient noise: tr(Sigma) = DIM * SIGMA^2 = 40
G_TRUE = torch.full((DIM,), 0.25)  # |G|^2 = 2.5, so B_simple = 16


def test_noise_scale_terms_are_unbiased_on_synthetic_gradients():
    """Per-sample gradients G + eps: the two estimates average to |G|^2 and tr(Sigma) (4 standard errors)."""
    gen = torch.Generator().manual_seed(0)
    trials, b_small, n_small = 4000, 8, 4
    samples = G_TRUE + SIGMA * torch.randn(trials, n_small, b_small, DIM, generator=gen, dtype=torch.float64)
    small = samples.mean(2)  # [trials, n_small, DIM]: the small batches (e.g. ranks)
    big = small.mean(1)  # the all-reduced gradient of 32 samples
    small_sq = small.pow(2).sum(-1).mean(1)
    grad_sq, trace = noise_scale_terms(small_sq, big.pow(2).sum(-1), b_small, b_small * n_small)
    for est, true in ((grad_sq, G_TRUE.pow(2).sum().item()), (trace, DIM * SIGMA**2)):
        sem = est.std() / trials**0.5
        assert abs(est.mean().item() - true) < 4 * sem.item(), (est.mean().item(), true)
    # Without the correction the naive |G_big|^2 is biased upward by tr(Sigma) / B_big = 1.25.
    assert big.pow(2).sum(-1).mean().item() > G_TRUE.pow(2).sum().item() + 1.0
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_terms(small_sq, small_sq, 8, 8)


def test_noise_scale_estimator_ema_and_nonfinite_skip():
    """The EMA ratio converges to tr/|G|^2; a non-finite step is skipped and counted."""
    est = NoiseScaleEstimator(beta=0.5)
    b_s, b_b = 4.0, 16.0
    g2, tr = 2.0, 8.0
    small, big = g2 + tr / b_s, g2 + tr / b_b  # exact expectations
    est.update(torch.tensor(small), torch.tensor(big), b_s, b_b)
    est.update(torch.tensor(float("nan")), torch.tensor(big), b_s, b_b)
    assert est.skipped.item() == 1
    assert est.b_simple().item() == pytest.approx(tr / g2)
    assert est.grad_sq().item() == pytest.approx(g2) and est.trace().item() == pytest.approx(tr)
    clone = NoiseScaleEstimator()
    clone.load_state_dict(est.state_dict())
    assert clone.b_simple().item() == pytest.approx(tr / g2) and clone.beta == 0.5
    with pytest.raises(ValueError, match="Invalid beta"):
        NoiseScaleEstimator(beta=1.0)


def _ddp_hook_worker(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-4)  # several buckets
    norms = MicroBatchGradNorms(model.parameters())
    gen = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 2, generator=gen)
    # Reference: this rank's own gradient, computed on a copy without DDP.
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    ref.load_state_dict(model.state_dict())
    local = torch.autograd.grad(nn.functional.mse_loss(ref(x), y), list(ref.parameters()))
    local_sq = sum(g.pow(2).sum() for g in local)
    nn.functional.mse_loss(ddp(x), y).backward()
    got = norms.pop()
    torch.testing.assert_close(got, local_sq, rtol=1e-5, atol=1e-7)
    averaged_sq = sum(p.grad.pow(2).sum() for p in model.parameters())
    assert abs(averaged_sq - local_sq) > 1e-4 * local_sq  # .grad holds the all-reduced mean, not the local one
    # Passes with capture paused (HVPs) are ignored.
    with curvature_capture_paused():
        torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    assert norms.pop().item() == 0.0
    norms.remove()


def test_micro_batch_grad_norms_see_the_local_gradient_under_ddp():
    """With 2 gloo ranks the hooks measure each rank's own gradient, before DDP averages it."""
    spawn_gloo(_ddp_hook_worker, world_size=2)


def linear_loss_module(pl):
    """loss = mean_j x_j . w: the per-sample gradient is x_j itself, whatever w is."""

    class LinearLoss(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(DIM))

        def training_step(self, batch, batch_idx):
            return (batch[0] @ self.w).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LinearLoss()


def synthetic_loader(num: int, batch_size: int, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = G_TRUE + SIGMA * torch.randn(num, DIM, generator=gen)
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False, drop_last=True)


def test_gradient_noise_scale_callback_from_micro_batches(tmp_path):
    """One process, accumulate_grad_batches=4: B_simple of the linear-loss problem is 16 (tr 40 / |G|^2 2.5).

    The spread of this estimate over 30 seeds (simulated) is 2.5%; the tolerance is 10%.
    """
    import pytorch_lightning as pl

    cb = GradientNoiseScale(beta=0.99, log_every_n_steps=1)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[cb])
    trainer.fit(linear_loss_module(pl), synthetic_loader(250 * 4 * 8, 8))
    assert cb.estimator.updates == 250
    assert cb.estimator.trace().item() == pytest.approx(DIM * SIGMA**2, rel=0.1)
    assert cb.estimator.grad_sq().item() == pytest.approx(2.5, rel=0.1)
    assert cb.b_simple() == pytest.approx(16.0, rel=0.1)
    logged = trainer.callback_metrics
    assert logged["noise_scale/global_batch"].item() == 32
    assert logged["noise_scale/b_simple"].item() == pytest.approx(cb.b_simple(), rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_noise_scale_hooks_measure_only_with_two_batch_sizes(tmp_path, accumulate):
    """One process without accumulation: the per-backward hooks record no norm (they would go unread)."""
    import pytorch_lightning as pl

    recorded = []

    class Spy(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            recorded.append(len(cb._norms._sq))

    cb = GradientNoiseScale(probe_every_n_steps=None, log_every_n_steps=1)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[cb, Spy()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-size run warns that it measures nothing
        trainer.fit(linear_loss_module(pl), synthetic_loader(64, 8))
    assert cb.estimator.updates == (0 if accumulate == 1 else 4)
    assert recorded == ([0] * 8 if accumulate == 1 else [1, 2] * 4)


def test_gradient_noise_scale_rejects_fp16_scaler_and_warns_without_two_sizes(pl_package, tmp_path):
    """Without the probe, a single batch size is skipped with a warning; nothing is estimated."""
    cb = GradientNoiseScale(probe_every_n_steps=None)
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, callbacks=[cb])
    with pytest.warns(UserWarning, match="needs two batch sizes"):
        trainer.fit(linear_loss_module(pl_package), synthetic_loader(32, 8))
    assert cb.estimator.updates == 0
    with pytest.raises(ValueError, match="Invalid log_every_n_steps"):
        GradientNoiseScale(log_every_n_steps=0)
    with pytest.raises(ValueError, match="Invalid probe_every_n_steps"):
        GradientNoiseScale(probe_every_n_steps=0)


def test_split_batch_estimator_matches_exact_per_example_noise_scale(one_thread):
    """Two-halves probe averaged over random batches: B_simple within 10% of tr(Sigma)/|G|^2 from per-example grads."""
    from torch.func import functional_call, grad, vmap

    from lightning_lbo.noise_scale import split_batch_sq_norms

    gen = torch.Generator().manual_seed(0)
    n, batch = 512, 32
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    params = dict(model.named_parameters())

    def example_loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(n, -1) for g in per_example.values()], dim=1).double()  # [n, P]
    mean = flat.mean(0)
    exact = ((flat - mean).pow(2).sum(1).mean() / mean.pow(2).sum()).item()  # population tr(Sigma) / |G|^2
    small, big = [], []
    for _ in range(800):  # batches drawn with replacement: E|G_B|^2 = |G|^2 + tr(Sigma) / B exactly
        idx = torch.randint(0, n, (batch,), generator=gen)
        s, b, b_small, b_big = split_batch_sq_norms(model, (x[idx], y[idx]), model.parameters())
        small.append(s)
        big.append(b)
    grad_sq, trace = noise_scale_terms(torch.stack(small).double().mean(), torch.stack(big).double().mean(),
                                       b_small, b_big)
    assert (b_small, b_big) == (16, 32)
    assert (trace / grad_sq).item() == pytest.approx(exact, rel=0.10)
    assert all(p.grad is None for p in model.parameters())  # the probe leaves .grad alone


def test_split_batch_probe_restores_batch_norm_buffers():
    """The probe's train-mode passes leave running statistics and the training flag as they were."""
    from lightning_lbo.noise_scale import split_batch_sq_norms

    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split_batch_sq_norms(model, (torch.randn(10, 4), torch.randint(0, 2, (10,))), model.parameters())
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="two halves"):
        split_batch_sq_norms(model, (torch.randn(1, 4), torch.zeros(1, dtype=torch.long)), model.parameters())
