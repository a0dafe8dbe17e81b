"""A generated block of a Markdown page: the lines between two HTML-comment markers, checked or
rewritten by a script (scripts/update_methods_doc.py, scripts/update_layout_doc.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def generated_block(text: str, start: str, end: str) -> str:
    """The lines between the markers of ``text`` (without the markers)."""
    if start not in text or end not in text:
        raise ValueError("the markers of the generated block are missing")
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def with_block(text: str, start: str, end: str, block: str) -> str:
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


def check_or_rewrite(doc: Path, block: str, start: str, end: str, what: str, description: str,
                     argv: list[str] | None = None) -> int:
    """The scripts' command line: rewrite ``doc``'s block, or with --check exit 1 if it is out of date."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"only check; exit 1 if the {what} is out of date")
    args = parser.parse_args(argv)
    text = doc.read_text()
    if generated_block(text, start, end) == block:
        print(f"{doc.name}: the {what} is current")
        return 0
    if args.check:
        print(f"{doc.name}: the {what} is out of date; run python {Path(sys.argv[0]).name}", file=sys.stderr)
        return 1
    doc.write_text(with_block(text, start, end, block))
    print(f"{doc.name}: {what} rewritten")
    return 0
