"""Support for both Lightning distributions: ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages ship the same Trainer under two import names, and a Trainer only accepts callbacks,
modules and strategies built on *its own* base classes. lightning_lbo never picks one silently:

* Callbacks derive from the ``Callback`` of **every** installed distribution at once
  (:func:`callback_bases`), so one instance works with either Trainer. Lightning's callback base
  classes hold no state, which makes this multiple inheritance safe.
* Classes that carry state in their base (``LightningModule``, ``DDPStrategy``) are built once per
  distribution by a cached factory; the user names the distribution, or it is read off the Trainer
  (:func:`package_of`).
* Strategies are registered under the same name in the ``StrategyRegistry`` of every installed
  distribution when :mod:`lightning_lbo` is imported.

``pytorch_lightning`` is a hard dependency; ``lightning.pytorch`` is used when installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache, lru_cache, wraps
from types import ModuleType
from typing import Any

PYTORCH_LIGHTNING = "pytorch_lightning"
LIGHTNING_PYTORCH = "lightning.pytorch"
PACKAGE_NAMES = (PYTORCH_LIGHTNING, LIGHTNING_PYTORCH)


@cache
def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def available_packages() -> tuple[str, ...]:
    """Names of the Lightning distributions importable here, ``pytorch_lightning`` first."""
    return tuple(name for name in PACKAGE_NAMES if _try_import(name) is not None)


def lightning_package(name: str = PYTORCH_LIGHTNING) -> ModuleType:
    """Import a Lightning distribution by name, with an error that says how to install it."""
    if name not in PACKAGE_NAMES:
        raise ValueError(f"Unknown Lightning package {name!r}. Supported: {PACKAGE_NAMES}.")
    module = _try_import(name)
    if module is None:
        dist = "pytorch-lightning" if name == PYTORCH_LIGHTNING else "lightning"
        raise ModuleNotFoundError(f"{name} is not installed: `pip install {dist}`.")
    return module


def package_of(obj: Any) -> str:
    """The Lightning distribution a Trainer, module or strategy instance belongs to."""
    for name in available_packages():
        pkg = lightning_package(name)
        if isinstance(obj, (pkg.Trainer, pkg.LightningModule, pkg.Callback)):
            return name
        if isinstance(obj, pkg.strategies.Strategy):
            return name
    raise TypeError(
        f"{type(obj).__name__} is not an object of {' or '.join(available_packages())}; "
        "pass a Lightning Trainer, LightningModule or Strategy."
    )


def callback_bases() -> tuple[type, ...]:
    """``Callback`` of every installed distribution, to derive a callback usable by both Trainers."""
    return tuple(lightning_package(name).Callback for name in available_packages())



def per_package(build: Callable[[str], type]) -> Callable[..., type]:
    """Decorate ``build(package) -> class`` into ``get(package="pytorch_lightning")`` that builds each class once.

    One cache key per package: ``get()`` and ``get("pytorch_lightning")`` return the same class, which
    pickling (``ddp_spawn``) needs.
    """
    cached = lru_cache(maxsize=None)(build)

    @wraps(build)
    def get(package: str = PYTORCH_LIGHTNING) -> type:
        return cached(package)

    return get


def publish_per_package(cls: type, module_name: str, package: str) -> type:
    """Give a class built by a per-package factory a module-level name, so pickle (``ddp_spawn``) finds it.

    The ``pytorch_lightning`` class keeps its plain name; the ``lightning.pytorch`` one is published
    as ``<Name>_lightning_pytorch`` in the same module (its ``__name__`` stays plain for reprs).
    """
    import sys

    suffix = "" if package == PYTORCH_LIGHTNING else "_" + package.replace(".", "_")
    cls.__module__ = module_name
    cls.__qualname__ = cls.__name__ + suffix
    setattr(sys.modules[module_name], cls.__qualname__, cls)
    return cls
