"""HessianSpectrum callback: logged values vs the dense Hessian, plots to loggers / PNG, DDP end to end."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lbo.callbacks import hessian_spectrum as hs_module
from lightning_lbo.callbacks.gradient_noise_scale import GradientNoiseScale
from lightning_lbo.callbacks.hessian_spectrum import HessianSpectrum
from lightning_lbo.classifier import classifier_module_class, sgd_factory
from lightning_lbo.hessian import HessianOperator, parameters_of, top_eigenvalues
from tests.conftest import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: no thread contention


def bn_classifier(package: str):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    return classifier_module_class(package)(net, num_classes=3, optimizer=sgd_factory(lr=0.05, weight_decay=0.0))


def loader(n: int = 32, batch_size: int = 16, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def last_layer(module: nn.Module) -> list[torch.Tensor]:
    return parameters_of(module.model[3])


def test_hessian_spectrum_logs_dense_values_and_writes_png(pl_package, tmp_path):
    """Top eigenvalues/trace equal the dense Hessian of the fixed batch; no image logger -> PNG in the log dir."""
    cb = HessianSpectrum(top_k=2, max_iters=60, tol=1e-6, trace_samples=40, density_probes=1, density_steps=12,
                         param_groups={"all": parameters_of, "last": last_layer})
    logger = pl_package.loggers.CSVLogger(str(tmp_path))
    trainer = make_trainer(pl_package, tmp_path, max_epochs=1, logger=logger, callbacks=[cb])
    module = bn_classifier(pl_package.__name__)
    trainer.fit(module, loader(), loader(16, 16, seed=1))  # validation (inference mode) runs before the hook
    metrics = trainer.callback_metrics
    for name, params, suffix in (("all", parameters_of(module), ""), ("last", last_layer(module), "/last")):
        dense = HessianOperator(module, cb.fixed.batches, params=params).dense().double()
        evals = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)
        for i in range(2):
            assert metrics[f"hessian/eig_{i}{suffix}"].item() == pytest.approx(evals[i].item(), rel=1e-2)
        result = cb.last[name]
        assert abs(result["trace"] - dense.trace().item()) < 4 * result["trace_std_error"] + 1e-6
    pngs = sorted(os.listdir(os.path.join(logger.log_dir, "hessian")))
    assert pngs == ["density_epoch0.png", "density_last_epoch0.png"]


def test_hessian_spectrum_sends_the_density_to_tensorboard(tmp_path):
    """With a TensorBoardLogger the density plot is an image summary, not a PNG file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = HessianSpectrum(top_k=1, trace_samples=0, density_probes=1, density_steps=8)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path))
    trainer = make_trainer(pl, tmp_path, max_epochs=1, logger=logger, callbacks=[cb])
    trainer.fit(bn_classifier("pytorch_lightning"), loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "hessian/density" in acc.Tags()["images"]
    assert "hessian/eig_0" in acc.Tags()["scalars"] and cb.png_paths == []


def test_hessian_spectrum_configuration_errors(monkeypatch):
    """Bad arguments and a missing matplotlib fail at construction, naming the fix."""
    with pytest.raises(ValueError, match="Invalid method"):
        HessianSpectrum(method="qr")
    with pytest.raises(ValueError, match="Invalid every_n_epochs"):
        HessianSpectrum(every_n_epochs=0)
    monkeypatch.setattr(hs_module, "_matplotlib_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib"):
        HessianSpectrum()
    HessianSpectrum(plot=False)
    with pytest.raises(ValueError, match=r"top_k=1000 eigenvalues need at least 1000 Lanczos steps, but max_iters=20"):
        HessianSpectrum(top_k=1000)


def test_hessian_spectrum_warns_once_when_fewer_than_top_k_eigenvalues_exist(tmp_path):
    """A group with fewer parameters than top_k logs what exists, and says so once."""
    cb = HessianSpectrum(top_k=20, max_iters=40, trace_samples=0, density_probes=0,
                         param_groups={"bias": lambda m: [m.model[3].bias]})
    trainer = make_trainer(pl, tmp_path, max_epochs=2, callbacks=[cb], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"3 of top_k=20 eigenvalues of group 'bias' .* has 3 parameters") as record:
        trainer.fit(bn_classifier("pytorch_lightning"), loader())
    assert sum("top_k=20" in str(w.message) for w in record) == 1  # once, not every epoch
    assert len(cb.last["bias"]["eigenvalues"]) == 3
    assert {f"hessian/eig_{i}/bias" for i in range(3)} <= set(trainer.callback_metrics)


class CheckInWorkers(pl.Callback):
    """Asserts inside each ddp_spawn worker (state is not copied back)."""

    def __init__(self, spectrum: HessianSpectrum, noise: GradientNoiseScale) -> None:
        self.spectrum, self.noise = spectrum, noise

    def on_fit_end(self, trainer, pl_module):
        # One process holding both ranks' fixed batches gives the eigenvalue logged under DDP.
        x, y = self.spectrum.fixed.batches[0]
        xs, ys = trainer.strategy.all_gather(x), trainer.strategy.all_gather(y)
        assert xs.shape[0] == 2 and not torch.equal(xs[0], xs[1])
        local = HessianOperator(pl_module, [(xs.flatten(0, 1), ys.flatten(0, 1))], distributed=False)
        want = top_eigenvalues(local, k=1, max_iters=60, tol=1e-6).eigenvalues[0]
        assert self.spectrum.last["all"]["eigenvalues"][0] == pytest.approx(want, rel=1e-4)
        # Noise scale: two batch sizes (8 per rank, 16 in all) from the rank-local hooks.
        assert self.noise.estimator.updates == trainer.global_step > 0
        assert torch.isfinite(self.noise.estimator.b_simple())
        assert trainer.callback_metrics["noise_scale/global_batch"].item() == 16


def test_hessian_spectrum_and_noise_scale_under_ddp_spawn(tmp_path):
    """2 processes: the all-reduced HVPs reproduce one process on both ranks' batches; the noise scale runs."""
    spectrum = HessianSpectrum(top_k=1, max_iters=60, tol=1e-6, trace_samples=0, density_probes=0)
    noise = GradientNoiseScale(beta=0.9, log_every_n_steps=1)
    trainer = make_trainer(pl, tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2,
                           callbacks=[spectrum, noise, CheckInWorkers(spectrum, noise)])
    trainer.fit(bn_classifier("pytorch_lightning"), loader(64, 8))


def test_hessian_spectrum_sends_the_density_to_wandb(tmp_path, monkeypatch):
    """With a WandbLogger the density plot is logged as a wandb.Image (wandb's network is off in tests)."""
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install lightning-lbo[wandb])")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cb = HessianSpectrum(top_k=1, trace_samples=0, density_probes=1, density_steps=8)
    logger = pl.loggers.WandbLogger(save_dir=str(tmp_path))
    logged = []
    monkeypatch.setattr(logger.experiment, "log", lambda data, *args, **kwargs: logged.append(data))
    trainer = make_trainer(pl, tmp_path, max_epochs=1, logger=logger, callbacks=[cb])
    try:
        trainer.fit(bn_classifier("pytorch_lightning"), loader())
    finally:
        # Close the run and reset wandb's process-wide settings (mode "disabled"): a later WandbLogger
        # (tests/test_examples.py's offline run) would inherit them and write nothing.
        wandb.finish()
        wandb.teardown()
    images = [value for data in logged for value in data.values() if isinstance(value, wandb.Image)]
    assert len(images) == 1 and cb.png_paths == []
