"""Generated documentation is current: docs/methods.md holds exactly what ``moma methods --markdown``
prints between its markers."""

from __future__ import annotations

from conftest import load_script


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
