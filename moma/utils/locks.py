"""Exclusive file locks, so that several processes can share one folder: the first that needs a
thing built builds it while the others wait (a comparison grid's shard processes, or two runs
building the same tile store or teacher cache).

``fcntl.flock`` locks are released by the kernel when their process ends, so a killed process
leaves no stale claim behind. On Linux NFS clients flock is carried out as a POSIX byte-range lock,
which NFS (v3 with lockd, v4) enforces across nodes; a file system without locking support raises at
the first lock. Where ``fcntl`` does not exist (Windows) locking is skipped: run one process per folder.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) inside the block. Yields True when
    held; with ``wait=False`` yields False at once if another process holds it."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
