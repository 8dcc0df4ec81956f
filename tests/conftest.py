"""Shared fixtures: isolated environment, seeds, offline wandb, both Lightning packages."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_lbo.compat import PACKAGE_NAMES, available_packages, lightning_package

# Tests never talk to wandb's servers, and two DDP processes must not fight over two cores.
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def restore_env_and_seed():
    """Restore os.environ after each test (DDP sets MASTER_PORT, LOCAL_RANK, ...) and seed everything."""
    saved = dict(os.environ)
    torch.manual_seed(0)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny problems, where thread synchronisation costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=PACKAGE_NAMES)
def pl_package(request):
    """Each Lightning distribution in turn (``pytorch_lightning``, ``lightning.pytorch``).

    ``lightning`` is a dev dependency, so both run in `make test`; a user's environment without it
    reports the skip.
    """
    if request.param not in available_packages():
        pytest.skip(f"{request.param} is not installed (pip install lightning)")
    return lightning_package(request.param)


def make_trainer(pl, tmp_path, **kwargs):
    """A quiet CPU Trainer for tests: no logger, no checkpointing, no progress bar unless asked."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
