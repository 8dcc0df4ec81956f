"""The pure-torch core imports no Lightning; strategies reach whichever Lightning is imported, in either order."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import textwrap
import warnings

import pytest

from lightning_lbo.compat import _PostImportFinder, after_import

LIGHTNING_MODULES = ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")

# The core modules; NO_LIGHTNING_YET asserts that no Lightning package came with them.
CORE = """
import lightning_lbo, lightning_lbo.optim, lightning_lbo.schedules, lightning_lbo.hessian
import lightning_lbo.optim.kfac, lightning_lbo.param_groups, lightning_lbo.batchnorm, lightning_lbo.models
import lightning_lbo.data, lightning_lbo.classifier, lightning_lbo.cli, lightning_lbo.compat, lightning_lbo.capture
import lightning_lbo.noise_scale, lightning_lbo.adversarial, lightning_lbo.strategies.ddp_kfac
lightning_lbo.KFAC, lightning_lbo.LARS, lightning_lbo.LAMB, lightning_lbo.RMSpropWarmup
lightning_lbo.hessian.top_eigenvalues
"""
NO_LIGHTNING_YET = """
loaded = [m for m in {names} if m in sys.modules]
assert not loaded, f"the core imported {{loaded}}"
"""

# In a fresh interpreter: `first`, then `second` import; then a Trainer resolves "ddp_kfac".
STRATEGY = """
import sys
{first}
{second}
import {package} as pl
from lightning_lbo.strategies.ddp_kfac import kfac_ddp_strategy_class

trainer = pl.Trainer(strategy="ddp_kfac", accelerator="cpu", devices=1, logger=False)
assert isinstance(trainer.strategy, kfac_ddp_strategy_class("{package}")), type(trainer.strategy).__mro__
assert "ddp_kfac_spawn" in pl.strategies.StrategyRegistry
print(sorted(m for m in {names} if m in sys.modules))
"""


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return eval(out.strip().splitlines()[-1])  # the printed sorted list of module names


def test_import_light_core_and_both_orders_in_fresh_interpreters():
    """Core imports no Lightning; Trainer(strategy="ddp_kfac") works for each package, imported before or after."""
    names = repr(LIGHTNING_MODULES)
    procs = {}
    for package in ("pytorch_lightning", "lightning.pytorch"):
        lightning, checked_core = f"import {package}", CORE + NO_LIGHTNING_YET.format(names=names)
        orders = {"lightning first": (lightning, CORE), "core first": (checked_core, lightning)}
        for order, (first, second) in orders.items():
            procs[package, order] = _python(STRATEGY.format(first=first, second=second, package=package, names=names))
    for (package, order), proc in procs.items():
        loaded = _result(proc)
        # The strategy of one package never imports the other one.
        other = "lightning" if package == "pytorch_lightning" else "pytorch_lightning"
        assert package in loaded and other not in loaded, (package, order, loaded)


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """A module `lbo_fake_pkg` on sys.path; removed from sys.modules afterwards."""
    (tmp_path / "lbo_fake_pkg.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield tmp_path / "lbo_fake_pkg.py"
    sys.modules.pop("lbo_fake_pkg", None)
    _PostImportFinder.instance().hooks.pop("lbo_fake_pkg", None)


def test_after_import_runs_the_hook_once_after_the_module_finished(fake_module):
    """The hook sees the complete module, once; the module keeps its real loader; the finder leaves meta_path."""
    seen = []
    after_import("lbo_fake_pkg", lambda m: seen.append((m.__name__, m.VALUE)))
    assert importlib.util.find_spec("lbo_fake_pkg") is not None  # an availability check consumes nothing
    assert seen == []
    import lbo_fake_pkg

    assert seen == [("lbo_fake_pkg", 41)]
    assert type(lbo_fake_pkg.__loader__).__name__ == "SourceFileLoader"
    assert lbo_fake_pkg.__spec__.loader is lbo_fake_pkg.__loader__
    assert "lbo_fake_pkg" not in _PostImportFinder.instance().hooks
    after_import("lbo_fake_pkg", lambda m: seen.append("now"))  # already imported: runs at once
    assert seen[-1] == "now" and len(seen) == 2


def test_after_import_hook_error_warns_and_import_succeeds(fake_module):
    """A failing hook turns into a RuntimeWarning naming the module; the user's import is unaffected."""

    def broken(module):
        raise KeyError("registry")

    after_import("lbo_fake_pkg", broken)
    with pytest.warns(RuntimeWarning, match="failed after `import lbo_fake_pkg`.*registry"):
        import lbo_fake_pkg
    assert lbo_fake_pkg.VALUE == 41


def test_after_import_survives_a_failed_import(fake_module):
    """If the module's own import fails, the hook waits for the next, successful import."""
    fake_module.write_text("raise ImportError('not yet')\n")
    seen = []
    after_import("lbo_fake_pkg", seen.append)
    with pytest.raises(ImportError, match="not yet"):
        import lbo_fake_pkg  # noqa: F401
    assert seen == []
    fake_module.write_text("VALUE = 2\n")
    sys.modules.pop("lbo_fake_pkg", None)
    importlib.invalidate_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.import_module("lbo_fake_pkg")
    assert [m.VALUE for m in seen] == [2]
    assert module.__spec__.loader is module.__loader__
