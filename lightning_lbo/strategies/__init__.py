"""Lightning strategies, registered by name in every installed Lightning distribution.

* ``"ddp_kfac"`` / ``"ddp_kfac_spawn"``: :class:`~lightning_lbo.strategies.ddp_kfac.KFACDDPStrategy`,
  DDP plus K-FAC curvature sync (subprocess and spawn launchers).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"KFACDDPStrategy", "kfac_ddp_strategy_class"}


def register_strategies() -> None:
    """Register lightning_lbo's strategies (``ddp_kfac``) in each installed ``StrategyRegistry``.

    Called when :mod:`lightning_lbo` is imported; safe to call again (names already present are kept).
    """
    from lightning_lbo.compat import available_packages, lightning_package
    from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

    for package in available_packages():
        registry = lightning_package(package).strategies.StrategyRegistry
        kfac_ddp_strategy_class(package).register_strategies(registry)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from lightning_lbo.strategies import ddp_kfac

        return getattr(ddp_kfac, name)
    raise AttributeError(f"module 'lightning_lbo.strategies' has no attribute {name!r}")
