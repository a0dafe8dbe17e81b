"""The package's layers, read from its source: the building blocks (data, models, distillation
methods, low-level utilities) never import the engine, the comparison grid or the CLI above them,
and of those three each imports only the ones below it (engine < compare < the CLI: ``moma/cli.py``
and its handlers in ``moma/commands/``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moma"
UPPER = ("moma.engine", "moma.compare", "moma.cli", "moma.commands")
LOWER = ("data", "models", "distill", "utils")
# Modules the lower layers import themselves: they must not reach upward either.
SHARED = ("config.py", "metrics.py", "errors.py")


def _from_module(node: ast.ImportFrom, path: Path, package: Path) -> str | None:
    """The absolute module of ``from X import ...``; a relative one (``from ..engine import x``)
    is resolved against the file's place in ``package`` (the ``moma`` folder)."""
    if node.level == 0:
        return node.module
    parts = ["moma", *path.relative_to(package).parent.parts]
    if node.level > len(parts):
        return None  # beyond the top of the package: Python refuses it anyway
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module a file imports, at the top or inside a function, relative imports included
    (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, path, package)
            if module:
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def upward_imports(path: Path, package: Path = PACKAGE, above: tuple[str, ...] = UPPER) -> list[str]:
    return sorted(n for n in imported_modules(path, package) if n in above or n.startswith(tuple(f"{u}." for u in above)))


def layer_offenders(package: Path, layer: str, above: tuple[str, ...] = UPPER) -> dict[str, list[str]]:
    files = sorted((package / layer).rglob("*.py")) if (package / layer).is_dir() else [package / layer]
    assert files, layer
    offenders = {str(p.relative_to(package)): upward_imports(p, package, above) for p in files}
    return {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("layer", LOWER + SHARED)
def test_lower_layers_never_import_engine_compare_or_cli(layer):
    assert layer_offenders(PACKAGE, layer) == {}


@pytest.mark.parametrize("layer", ["engine", "compare"])
def test_engine_and_compare_never_import_the_layers_above_them(layer):
    above = UPPER[UPPER.index(f"moma.{layer}") + 1:]
    assert layer_offenders(PACKAGE, layer, above) == {}


def test_utils_depend_on_nothing_but_errors():
    for path in (PACKAGE / "utils").rglob("*.py"):
        own = {n for n in imported_modules(path) if n.startswith("moma")}
        assert own <= {"moma.errors"}, (path.name, own)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from moma.engine.io import atomic_path\n    import moma.cli\n")
    assert upward_imports(bad) == ["moma.cli", "moma.engine.io", "moma.engine.io.atomic_path"]


def test_the_check_sees_a_relative_upward_import_planted_in_a_copy_of_the_package(tmp_path):
    import shutil

    copy = tmp_path / "moma"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "data" / "planted.py").write_text("from ..engine import trainer\nfrom .. import cli\nfrom . import tiles\n")
    assert layer_offenders(copy, "data") == {"data/planted.py": ["moma.cli", "moma.engine", "moma.engine.trainer"]}
