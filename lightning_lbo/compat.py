"""Support for both Lightning distributions: ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages ship the same Trainer under two import names, and a Trainer only accepts callbacks,
modules and strategies built on *its own* base classes. lightning_lbo never picks one silently:

* Callbacks derive from the ``Callback`` of **every** installed distribution at once
  (:func:`callback_bases`), so one instance works with either Trainer. Lightning's callback base
  classes hold no state, which makes this multiple inheritance safe.
* Classes that carry state in their base (``LightningModule``, ``DDPStrategy``) are built once per
  distribution by a cached factory; the user names the distribution, or it is read off the Trainer
  (:func:`package_of`).
* Strategies are registered under the same name in the ``StrategyRegistry`` of each distribution
  *the user imports*, whichever is imported first: :func:`after_import` runs the registration at
  once for a distribution already imported, else right after its import finishes. Importing
  :mod:`lightning_lbo` itself imports no Lightning package (see docs/compat.md).

``pytorch_lightning`` is a hard dependency; ``lightning.pytorch`` is used when installed.
This module imports no Lightning package at import time.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from collections.abc import Callable
from functools import cache, lru_cache, wraps
from importlib.machinery import ModuleSpec
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


def default_class_attribute(module_name: str, class_name: str, factory: Callable[[str], type]
                            ) -> Callable[[str], type]:
    """A module ``__getattr__`` (PEP 562) that builds ``class_name`` on ``pytorch_lightning`` at first access.

    ``from lightning_lbo.data import FashionMNISTDataModule`` keeps working, while importing the
    module itself imports no Lightning package.
    """

    def __getattr__(name: str) -> type:
        if name == class_name:
            return factory(PYTORCH_LIGHTNING)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


def publish_per_package(cls: type, module_name: str, package: str) -> type:
    """Give a class built by a per-package factory a module-level name, so pickle (``ddp_spawn``) finds it.

    The ``pytorch_lightning`` class keeps its plain name; the ``lightning.pytorch`` one is published
    as ``<Name>_lightning_pytorch`` in the same module (its ``__name__`` stays plain for reprs).
    """
    suffix = "" if package == PYTORCH_LIGHTNING else "_" + package.replace(".", "_")
    cls.__module__ = module_name
    cls.__qualname__ = cls.__name__ + suffix
    setattr(sys.modules[module_name], cls.__qualname__, cls)
    return cls


# ---------------------------------------------------------------------------- post-import hooks
def _is_initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def after_import(module_name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call ``hook(module)`` once ``module_name`` is imported: now if it is, else right after its import.

    The hook runs at most once, in the importing thread, after the module's code has finished, so
    the module is complete. An exception in the hook becomes a warning: the user's ``import``
    succeeds whatever the hook does. Modules imported before this call that are still initializing
    (``lightning_lbo`` imported from inside ``module_name``'s own import) are not hooked.
    """
    module = sys.modules.get(module_name)
    if module is not None and not _is_initializing(module):
        _run_hook(hook, module)
        return
    _PostImportFinder.instance().add(module_name, hook)


def _run_hook(hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        hook(module)
    except Exception as err:  # noqa: BLE001 - the user's import must not fail because of us
        warnings.warn(f"lightning_lbo: {getattr(hook, '__qualname__', hook)} failed after `import "
                      f"{module.__name__}`: {err!r}", RuntimeWarning, stacklevel=2)


class _PostImportFinder:
    """A ``sys.meta_path`` finder that wraps the loader of hooked modules; finds nothing itself.

    It asks the finders behind it for the spec, then gives the spec a loader that runs the real
    loader and then the hooks. It leaves ``sys.meta_path`` once every hooked module is imported.
    """

    _instance: _PostImportFinder | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[ModuleType], None]]] = {}

    @classmethod
    def instance(cls) -> _PostImportFinder:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            if cls._instance not in sys.meta_path:
                sys.meta_path.insert(0, cls._instance)
            return cls._instance

    def add(self, module_name: str, hook: Callable[[ModuleType], None]) -> None:
        with self._lock:
            self.hooks.setdefault(module_name, []).append(hook)

    def take(self, module_name: str) -> list[Callable[[ModuleType], None]]:
        """Remove and return the hooks of ``module_name``; leave ``sys.meta_path`` when none are left."""
        with self._lock:
            hooks = self.hooks.pop(module_name, [])
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)
        return hooks

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a namespace package or a legacy loader: imported unhooked
        # The hooks are taken only when the module executes: importlib.util.find_spec alone
        # (availability checks of other libraries) consumes nothing.
        spec.loader = _HookedLoader(spec.loader, self)
        return spec


class _HookedLoader:
    """Runs the real loader, puts it back on the module (``__loader__``, ``__spec__.loader``), then the hooks."""

    def __init__(self, loader: Any, finder: _PostImportFinder) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        module.__spec__.loader = self.loader
        self.loader.exec_module(module)  # if it raises, the hooks wait for the next import
        for hook in self.finder.take(module.__name__):
            _run_hook(hook, module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


# ---------------------------------------------------------------------------- private Lightning and torch names
# Every private Lightning name the package uses (and torch's outside the K-FAC core) is read here only.
# tests/test_compat.py checks each one on the installed versions of both packages, so a release that moves
# one fails a test, not a user's run. (The K-FAC core's private torch names: lightning_lbo/optim/_torch_private.py.)

DDP_REGISTER_HOOKS = "_register_ddp_hooks"
"""``DDPStrategy``'s method that registers the DDP comm hook (CUDA only in Lightning); ``ddp_kfac`` overrides it."""


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a ``LightningOptimizer`` (its ``optimizer`` property), else ``optimizer``.

    Imports nothing: a ``LightningOptimizer`` exists only when its package is imported.
    """
    for package in PACKAGE_NAMES:
        module = sys.modules.get(f"{package}.core.optimizer")
        if module is not None and isinstance(optimizer, module.LightningOptimizer):
            return optimizer.optimizer
    return optimizer


def callback_state_key(callback: Any, **identity: Any) -> str:
    """A callback's checkpoint key made unique by ``identity`` (Lightning's protected
    ``Callback._generate_state_key``, the spelling its own stateful callbacks use)."""
    return callback._generate_state_key(**identity)


@cache
def batch_norm_base() -> type:
    """torch's base class of every normalisation layer with running statistics (BatchNorm*, SyncBatchNorm,
    InstanceNorm*, the lazy ones): ``torch.nn.modules.batchnorm._NormBase``, which has no public name."""
    from torch.nn.modules import batchnorm

    return batchnorm._NormBase


def strategy_timeout(strategy: Any) -> Any:
    """The collective timeout (``datetime.timedelta``) a DDP-like strategy was built with, ``None`` if it has none.

    Lightning keeps ``DDPStrategy(timeout=...)`` in the private ``_timeout`` (no public getter).
    """
    return getattr(strategy, "_timeout", None)


def ddp_comm_hook_settings(strategy: Any) -> tuple[Any, Any, Any]:
    """``(ddp_comm_hook, ddp_comm_state, ddp_comm_wrapper)`` a ``DDPStrategy`` was built with (private fields)."""
    return strategy._ddp_comm_hook, strategy._ddp_comm_state, strategy._ddp_comm_wrapper


def register_ddp_comm_hook(package: str, model: Any, strategy: Any) -> None:
    """Register ``strategy``'s DDP comm hook on ``model`` (a ``DistributedDataParallel``) on any device type,
    with the helper Lightning uses for CUDA (``<package>.overrides.distributed._register_ddp_comm_hook``)."""
    hook, state, wrapper = ddp_comm_hook_settings(strategy)
    register = importlib.import_module(f"{package}.overrides.distributed")._register_ddp_comm_hook
    register(model=model, ddp_comm_state=state, ddp_comm_hook=hook, ddp_comm_wrapper=wrapper)


def uses_distributed_sampler(trainer: Any) -> bool:
    """``Trainer(use_distributed_sampler=...)``: kept by the private accelerator connector (no public getter)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def map_tensors(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``tree`` (tuples, lists, dicts, namedtuples of tensors and other leaves) with ``fn`` applied to each
    tensor, other leaves kept: torch's pytree ``tree_map`` (``torch.utils._pytree``, no public spelling)."""
    import torch  # here: importing this module imports no torch
    from torch.utils import _pytree

    return _pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, tree)
