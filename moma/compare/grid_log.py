"""The grid's logging: the console shows the grid's own lines (the runs' chatter goes to their
train.log), and ``compare.log`` in the compare folder keeps them with every warning."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ConsoleFilter(logging.Filter):
    """Keeps the console to the grid's own lines: the runs' per-epoch chatter goes to their
    train.log only, and a warning the runs repeat (e.g. a re-initialised classifier in every cell
    of a setting) is shown once."""

    INNER = ("moma.engine", "moma.data", "moma.models", "moma.distill")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if not record.name.startswith(self.INNER) or record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextmanager
def grid_logging(out: Path) -> Iterator[None]:
    root = logging.getLogger()
    console_filter = ConsoleFilter()
    consoles = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(console_filter)
    file_handler = logging.FileHandler(out / "compare.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("moma.compare"))
    root.addHandler(file_handler)
    compare_log = logging.getLogger("moma.compare")  # the grid's own lines are shown at any root level
    previous_level = compare_log.level
    if compare_log.getEffectiveLevel() > logging.INFO:
        compare_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        compare_log.setLevel(previous_level)
        root.removeHandler(file_handler)
        file_handler.close()
        for handler in consoles:
            handler.removeFilter(console_filter)
