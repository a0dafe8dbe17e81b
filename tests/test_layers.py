"""The package's layers, read from its source: the building blocks (data, models, distillation
methods, low-level utilities) never import the engine, the comparison grid or the CLI above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moma"
UPPER = ("moma.engine", "moma.compare", "moma.cli")
LOWER = ("data", "models", "distill", "utils")
# Modules the lower layers import themselves: they must not reach upward either.
SHARED = ("config.py", "metrics.py", "errors.py")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def upward_imports(path: Path) -> list[str]:
    return sorted(n for n in imported_modules(path) if n in UPPER or n.startswith(tuple(f"{u}." for u in UPPER)))


@pytest.mark.parametrize("layer", LOWER + SHARED)
def test_lower_layers_never_import_engine_compare_or_cli(layer):
    files = sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / layer]
    assert files, layer
    offenders = {str(p.relative_to(PACKAGE)): upward_imports(p) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_utils_depend_on_nothing_but_errors():
    for path in (PACKAGE / "utils").rglob("*.py"):
        own = {n for n in imported_modules(path) if n.startswith("moma")}
        assert own <= {"moma.errors"}, (path.name, own)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from moma.engine.io import atomic_path\n    import moma.cli\n")
    assert upward_imports(bad) == ["moma.cli", "moma.engine.io", "moma.engine.io.atomic_path"]
