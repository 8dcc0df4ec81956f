"""Lightning strategies, registered by name with each Lightning distribution the user imports.

* ``"ddp_kfac"`` / ``"ddp_kfac_spawn"``: :class:`~lightning_lbo.strategies.ddp_kfac.KFACDDPStrategy`,
  DDP plus K-FAC curvature sync (subprocess and spawn launchers).

``import lightning_lbo`` calls :func:`register_on_import`: a distribution already imported gets the
strategies at once; one imported later gets them right after its own import finishes (a post-import
hook, :func:`lightning_lbo.compat.after_import`). So ``Trainer(strategy="ddp_kfac")`` works in either
import order, and ``import lightning_lbo`` alone imports no Lightning package.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

_EXPORTS = {"KFACDDPStrategy", "kfac_ddp_strategy_class"}


def register_strategies(package: str | None = None) -> None:
    """Register lightning_lbo's strategies (``ddp_kfac``, ``ddp_kfac_spawn``) in a ``StrategyRegistry``.

    Args:
        package: ``"pytorch_lightning"`` or ``"lightning.pytorch"``; ``None``: every installed one
            (this imports them). Safe to call again: names already present are kept.
    """
    from lightning_lbo.compat import available_packages, lightning_package
    from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

    for name in available_packages() if package is None else (package,):
        registry = lightning_package(name).strategies.StrategyRegistry
        kfac_ddp_strategy_class(name).register_strategies(registry)


def _register_with(module: ModuleType) -> None:
    register_strategies(module.__name__)


def register_on_import() -> None:
    """Register the strategies with each Lightning distribution once it is imported (now, if it is)."""
    from lightning_lbo.compat import PACKAGE_NAMES, after_import

    for package in PACKAGE_NAMES:
        after_import(package, _register_with)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from lightning_lbo.strategies import ddp_kfac

        return getattr(ddp_kfac, name)
    raise AttributeError(f"module 'lightning_lbo.strategies' has no attribute {name!r}")
