"""Generated documentation is current: docs/methods.md holds exactly what ``moma methods --markdown``
prints between its markers, and docs/layout.md lists every module under moma/ with its docstring's
first sentence; the paths its hand-written part names exist."""

from __future__ import annotations

import re

from conftest import ROOT, load_script


def test_methods_doc_table_is_what_the_registry_prints():
    doc = load_script("update_methods_doc")
    table = doc.registry_table()
    assert table.startswith("| method | what it does | reference | defaults |")
    assert doc.generated_block(doc.DOC.read_text()) == table, (
        "docs/methods.md is out of date: run python scripts/update_methods_doc.py")


def test_the_table_is_replaced_between_the_markers_only():
    doc = load_script("update_methods_doc")
    text = f"# intro\n\n{doc.START}\n| old |\n{doc.END}\n\nprose after\n"
    rewritten = doc.with_table(text, "| new |")
    assert rewritten == f"# intro\n\n{doc.START}\n| new |\n{doc.END}\n\nprose after\n"
    assert doc.generated_block(rewritten) == "| new |"


def test_layout_doc_lists_every_module_with_its_docstring():
    doc = load_script("update_layout_doc")
    table = doc.module_table()
    assert "| `moma/metrics.py` | Classification metrics" in table and "| `moma/data/slide_readers/` |" in table
    assert doc.generated_block(doc.DOC.read_text()) == table, (
        "docs/layout.md is out of date: run python scripts/update_layout_doc.py")


def test_a_new_module_changes_the_layout_table(tmp_path):
    doc = load_script("update_layout_doc")
    (tmp_path / "moma" / "sub").mkdir(parents=True)
    (tmp_path / "moma" / "__init__.py").write_text('"""The package."""\n')
    (tmp_path / "moma" / "sub" / "__init__.py").write_text('"""A sub-package: e.g. this one."""\n')
    (tmp_path / "moma" / "z.py").write_text('"""Last, at the top.\n\nNot this."""\n')
    (tmp_path / "moma" / "sub" / "a.py").write_text('"""See :class:`~moma.x.Y`. Not this."""\n')
    doc.ROOT = tmp_path
    assert doc.module_table(tmp_path / "moma").splitlines()[2:] == [
        "| `moma/` | The package. |", "| `moma/z.py` | Last, at the top. |",
        "| `moma/sub/` | A sub-package: e.g. this one. |", "| `moma/sub/a.py` | See `moma.x.Y`. |"]


def test_every_path_the_layout_doc_names_exists():
    text = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`((?:moma|tests|scripts)/[\w/.]*)`", text))
    assert {"moma/metrics.py", "tests/test_metrics.py", "moma/data/tiles.py", "tests/test_data.py",
            "moma/data/slide_readers/", "tests/test_slide_readers.py", "tests/test_extending.py"} <= named
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
