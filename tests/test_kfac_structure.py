"""The structure of the K-FAC core, checked from its source (issue 23, "Done when").

* no import cycles among the modules of ``lightning_lbo.optim.kfac`` (recursive). Only **module-level** imports
  count: the statements run when the module is imported (in its body, also inside a top-level ``if`` / ``try``,
  but not under ``if TYPE_CHECKING:``). An import inside a function or method runs when it is called, after every
  module is initialised, so it cannot make an import cycle;
* no upward imports: nothing under ``lightning_lbo/optim/`` imports Lightning (``lightning``,
  ``pytorch_lightning``) or the package's Lightning layer (``lightning_lbo.callbacks``, ``lightning_lbo.strategies``),
  counting **every** import, function-level ones too (a lazy import is still a dependency); nothing in
  ``optim/kfac/blocks/`` imports the preconditioner or the optimizer (directly, or a name from the
  ``lightning_lbo.optim.kfac`` package, whose ``__init__`` imports both);
* no file of ``optim/kfac/`` (recursive) over 450 lines.

The checkers read files with :mod:`ast` and import nothing; each is shown to fail on a synthetic package with the
defect (``tmp_path``), so a check that passes on the repository is one that could have failed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_lbo
from lightning_lbo.optim.kfac import KFACPreconditioner, StaleStatistics
from lightning_lbo.optim.kfac.settings import SETTINGS_GROUPS, describe

PACKAGE_ROOT = Path(lightning_lbo.__file__).parent.parent  # the directory holding the ``lightning_lbo`` package
KFAC = "lightning_lbo.optim.kfac"
OPTIM = "lightning_lbo.optim"
MAX_LINES = 450
UPWARD = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_lbo.callbacks", "lightning_lbo.strategies")
ABOVE_BLOCKS = (f"{KFAC}.preconditioner", f"{KFAC}.optimizer", KFAC)


# ---------------------------------------------------------------------------------------------------------- checkers
def modules_of(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of ``package`` and every module below it (``__init__.py`` is the package)."""
    base = root.joinpath(*package.split("."))
    found = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run at import: the body, into top-level ``if`` / ``try`` / ``with`` blocks (not into
    ``if TYPE_CHECKING:``, functions or classes)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def imported_modules(path: Path, module: str, known: set[str], module_level_only: bool) -> set[str]:
    """The dotted names ``path`` (module ``module``) imports. ``from pkg import name`` names ``pkg.name`` when that
    is a module in ``known``, else ``pkg``; relative imports are resolved against ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = _module_level(tree.body) if module_level_only else ast.walk(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module-level import edges among the modules of ``package`` (edges leaving it are dropped)."""
    modules = modules_of(root, package)
    known = set(modules_of(root, package.split(".")[0]))
    return {name: imported_modules(path, name, known, module_level_only=True) & set(modules)
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components with more than one module, and modules
    that import themselves (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _names(targets: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(t for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))


def forbidden_imports(root: Path, package: str, forbidden: tuple[str, ...], exact: bool = False
                      ) -> dict[str, list[str]]:
    """``{module: [imported names]}`` for every module of ``package`` that imports (anywhere in the file) one of
    ``forbidden`` or a module below it (``exact``: the names themselves only)."""
    modules = modules_of(root, package)
    known = set(modules_of(root, package.split(".")[0]))  # every module of the top package: ``from k import mod``
    found = {}
    for name, path in modules.items():
        targets = imported_modules(path, name, known, module_level_only=False)
        hits = sorted(t for t in targets if t in forbidden) if exact else _names(targets, forbidden)
        if hits:
            found[name] = hits
    return found


def long_files(root: Path, package: str, limit: int) -> dict[str, int]:
    """``{file: lines}`` of the files of ``package`` (recursive) longer than ``limit`` lines."""
    return {str(path.relative_to(root)): n for path in modules_of(root, package).values()
            if (n := len(path.read_text().splitlines())) > limit}


def _write_package(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ------------------------------------------------------------------------------------------ the repository's core
def test_kfac_structure_has_no_import_cycles():
    graph = import_graph(PACKAGE_ROOT, KFAC)
    assert f"{KFAC}.preconditioner" in graph and f"{KFAC}.blocks.base" in graph  # the walk found the core
    assert f"{KFAC}.factors" in graph[f"{KFAC}.blocks.base"]  # and its edges
    assert find_cycles(graph) == []


def test_kfac_structure_optim_imports_no_lightning_layer():
    assert forbidden_imports(PACKAGE_ROOT, OPTIM, UPWARD) == {}


def test_kfac_structure_blocks_import_nothing_above_them():
    assert forbidden_imports(PACKAGE_ROOT, f"{KFAC}.blocks", ABOVE_BLOCKS, exact=True) == {}


def test_kfac_structure_no_file_over_the_line_limit():
    assert len(modules_of(PACKAGE_ROOT, KFAC)) > 20  # the walk is recursive (blocks/ included)
    assert long_files(PACKAGE_ROOT, KFAC, MAX_LINES) == {}


def _logits(output):
    return output


def test_kfac_structure_every_setting_reads_under_its_constructor_name():
    """The read-only attributes generated from the settings objects cover every field, each a keyword argument
    of the constructor that reads back what was passed; the other keywords are the documented non-settings."""
    fields = {f.name: group for group, kind in SETTINGS_GROUPS.items() for f in dataclasses.fields(kind)}
    keywords = [n for n, p in inspect.signature(KFACPreconditioner).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert set(fields) <= set(keywords)
    assert set(keywords) - set(fields) == {"grad_scaler", "comm", "params", "block_types", "mc_seed", "shard_placement"}
    given = dict(damping=2e-3, factor_decay=0.5, factor_update_interval=3, inverse_update_interval=4,
                 inverse_method="eigen", fisher="mc", likelihood="categorical", output_to_logits=_logits,
                 kl_clip=None, stale_statistics=StaleStatistics(threshold=0.3), exclude=(nn.Tanh,),
                 linear_variant="reduce", l2=1e-4, low_rank_inverse=False, factor_dtype=torch.float64, classes_dim=-1)
    assert set(given) == set(fields)
    pre = KFACPreconditioner(None, **given)
    for name, group in fields.items():
        assert describe(getattr(pre, name)) == describe(given[name]) == describe(getattr(getattr(pre, group), name))
        with pytest.raises(AttributeError):
            setattr(pre, name, given[name])


# ------------------------------------------------------------------ each check fails on a package with the defect
def test_kfac_structure_cycle_checker_finds_a_synthetic_cycle(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\nimport pkg.sub.c\n",  # relative import, and a module importing itself
        "pkg/b.py": "from pkg.sub.c import thing\n",
        "pkg/lazy.py": "def f():\n    from pkg import lazy2\n",  # function-level: not an import-time edge
        "pkg/lazy2.py": "import pkg.lazy\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typed2\n",
        "pkg/typed2.py": "from pkg import typed\n",
        "pkg/guarded.py": "try:\n    from pkg import guarded2\nexcept ImportError:\n    pass\n",
        "pkg/guarded2.py": "from pkg import guarded\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.guarded", "pkg.guarded2"]]


def test_kfac_structure_upward_import_checker_finds_synthetic_imports(tmp_path):
    _write_package(tmp_path, {
        "top/__init__.py": "",
        "top/optim/__init__.py": "",
        "top/optim/ok.py": "import torch\nfrom top.optim import other\n",
        "top/optim/other.py": "def f():\n    import pytorch_lightning as pl\n",  # lazy: still counted
        "top/optim/deep/__init__.py": "from lightning.pytorch import Callback\n",
        "top/optim/deep/x.py": "from top.callbacks.kfac import KFACCallback\nimport lightning_fabric\n",
    })
    upward = ("lightning", "pytorch_lightning", "top.callbacks")
    assert forbidden_imports(tmp_path, "top.optim", upward) == {
        "top.optim.other": ["pytorch_lightning"], "top.optim.deep": ["lightning.pytorch"],
        "top.optim.deep.x": ["top.callbacks.kfac"]}  # lightning_fabric is another package, not lightning.*


def test_kfac_structure_blocks_checker_finds_a_synthetic_import_of_the_preconditioner(tmp_path):
    _write_package(tmp_path, {
        "k/__init__.py": "from k.pre import Pre\n",
        "k/pre.py": "class Pre: ...\n",
        "k/factors.py": "",
        "k/blocks/__init__.py": "",
        "k/blocks/ok.py": "from k import factors\n",  # a sibling module of the core: allowed
        "k/blocks/bad.py": "from ..pre import Pre\n",
        "k/blocks/via_package.py": "from k import Pre\n",  # through the package's __init__
    })
    assert forbidden_imports(tmp_path, "k.blocks", ("k.pre", "k"), exact=True) == {
        "k.blocks.bad": ["k.pre"], "k.blocks.via_package": ["k"]}


def test_kfac_structure_line_checker_finds_a_long_file(tmp_path):
    _write_package(tmp_path, {"p/__init__.py": "", "p/short.py": "x = 1\n" * MAX_LINES,
                              "p/inner/long.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_files(tmp_path, "p", MAX_LINES) == {str(Path("p", "inner", "long.py")): MAX_LINES + 1}


@pytest.mark.parametrize("source, expected", [
    ("from . import b\n", {"top.pkg.b"}), ("from .b import f\n", {"top.pkg.b"}),
    ("from .. import pkg\n", {"top.pkg"}), ("from ..pkg.b import f\n", {"top.pkg.b"}),
    ("import top.pkg.b as alias\n", {"top.pkg.b"})])
def test_kfac_structure_relative_imports_resolve(tmp_path, source, expected):
    _write_package(tmp_path, {"top/__init__.py": "", "top/pkg/__init__.py": "", "top/pkg/a.py": source,
                              "top/pkg/b.py": ""})
    known = set(modules_of(tmp_path, "top"))
    assert imported_modules(tmp_path / "top/pkg/a.py", "top.pkg.a", known, module_level_only=True) == expected
