"""Rewrite the module table of docs/layout.md from the tree: every package and module under moma/
with the first sentence of its docstring.

    python scripts/update_layout_doc.py          # rewrite the table in place
    python scripts/update_layout_doc.py --check  # exit 1 if the table is out of date

Only the lines between the two markers are generated; the rest of the page is prose.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moma"
DOC = ROOT / "docs" / "layout.md"
START = "<!-- module table: generated from the tree; update with `python scripts/update_layout_doc.py` -->"
END = "<!-- end of the generated module table -->"
# A sentence ends at a full stop followed by a capital, a quote or the end ("e.g. a" does not end one).
_SENTENCE = re.compile(r"(.+?\.)(?=\s+[A-Z`\"(*]|$)")
_SPHINX_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :class:`~moma.config.Config` -> `moma.config.Config`


def first_sentence(path: Path) -> str:
    """The first sentence of the first paragraph of ``path``'s docstring, on one line."""
    docstring = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    sentence = _SPHINX_ROLE.sub(r"`\1`", match.group(1) if match else paragraph)
    return sentence.replace("|", "\\|")


def modules(package: Path = PACKAGE) -> list[Path]:
    """Every module, package by package (a package's ``__init__.py`` first, its sub-packages after it)."""
    files = (p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files, key=lambda p: (p.parent.relative_to(package).parts, p.name != "__init__.py", p.name))


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return rel.removesuffix("__init__.py") if path.name == "__init__.py" else rel


def module_table(package: Path = PACKAGE) -> str:
    rows = [f"| `{_name(path)}` | {first_sentence(path)} |" for path in modules(package)]
    return "\n".join(["| module | what it is |", "|---|---|", *rows])


def generated_block(text: str) -> str:
    return doc_block.generated_block(text, START, END)


def with_table(text: str, table: str) -> str:
    return doc_block.with_block(text, START, END, table)


def main(argv: list[str] | None = None) -> int:
    return doc_block.check_or_rewrite(DOC, module_table(), START, END, "module table", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
