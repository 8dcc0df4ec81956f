"""lightning_lbo: large-batch optimization for PyTorch Lightning.

Warmup and slow-start schedules, batch norm without moving averages, LARS/LAMB, RMSprop warm-up,
K-FAC / SP-NGD natural gradient with distributed curvature sync over DDP, adaptive batch size and
Hessian tools.

Importing the package imports no Lightning package (nor torch): names are resolved on first access.
Its strategies (``ddp_kfac``) are registered with ``pytorch_lightning`` and ``lightning.pytorch``
as each is imported, before or after this package (:mod:`lightning_lbo.strategies`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it; imported on first access so `import lightning_lbo` stays light.
_EXPORTS = {
    "KFAC": "lightning_lbo.optim.kfac",
    "KFACPreconditioner": "lightning_lbo.optim.kfac",
    "LARS": "lightning_lbo.optim.lars",
    "LAMB": "lightning_lbo.optim.lars",
    "RMSpropWarmup": "lightning_lbo.optim.rmsprop_warmup",
    "ClassifierModule": "lightning_lbo.classifier",
    "FashionMNISTDataModule": "lightning_lbo.data",
}
_SUBMODULES = {"recipes", "schedules", "param_groups", "callbacks", "strategies", "hessian", "optim", "models",
               "data", "classifier", "compat"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"lightning_lbo.{name}")
    raise AttributeError(f"module 'lightning_lbo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


from lightning_lbo.strategies import register_on_import  # noqa: E402

register_on_import()
