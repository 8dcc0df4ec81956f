"""Lightning strategies, registered by name in every installed Lightning distribution."""

from __future__ import annotations


def register_strategies() -> None:
    """Register lightning_lbo's strategies (``ddp_kfac``) in each installed ``StrategyRegistry``.

    Called when :mod:`lightning_lbo` is imported; safe to call again.
    """
