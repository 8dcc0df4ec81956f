"""The public API of DESIGN.md resolves: every exported name imports, strategies are registered."""

from __future__ import annotations

import torch

import lightning_lbo
import lightning_lbo.callbacks as callbacks


def test_every_exported_name_resolves():
    """Each name in the package's and callbacks' __all__ imports (the lazy export tables have no typo)."""
    for module in (lightning_lbo, callbacks):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    for optimizer in (lightning_lbo.KFAC, lightning_lbo.LARS, lightning_lbo.LAMB, lightning_lbo.RMSpropWarmup):
        assert issubclass(optimizer, torch.optim.Optimizer)


def test_strategies_registered_in_each_installed_package(pl_package):
    """`import lightning_lbo` registers ddp_kfac and ddp_kfac_spawn with the Trainer's own registry."""
    registry = pl_package.strategies.StrategyRegistry
    assert "ddp_kfac" in registry and "ddp_kfac_spawn" in registry
