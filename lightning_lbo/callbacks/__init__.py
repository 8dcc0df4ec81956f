"""Lightning callbacks: thin layers that decide when the pure-torch code runs and where it logs.

Every callback derives from the ``Callback`` of each installed Lightning distribution, so one
instance works with a ``pytorch_lightning`` and a ``lightning.pytorch`` Trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LRSchedule": "lightning_lbo.callbacks.lr_schedule",
    "BatchNormStats": "lightning_lbo.callbacks.batchnorm_stats",
    "HessianSpectrum": "lightning_lbo.callbacks.hessian_spectrum",
    "AdaptiveBatchSize": "lightning_lbo.callbacks.adaptive_batch_size",
    "AdversarialTraining": "lightning_lbo.callbacks.adversarial_training",
    "GradientNoiseScale": "lightning_lbo.callbacks.gradient_noise_scale",
    "FractionalEpoch": "lightning_lbo.callbacks.fractional_epoch",
    "NonFiniteBatchGuard": "lightning_lbo.callbacks.nonfinite_batches",
    "KFACCallback": "lightning_lbo.callbacks.kfac",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_lbo.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
