"""Exclusive file locks for ``moma compare``: several ``moma compare --shard K/N`` processes (one
per GPU, or a SLURM job array over nodes) share one compare folder; a teacher is trained by the first
process that needs it while the others wait, and a cell is never trained by two processes at once.
The lock itself (``exclusive``: ``fcntl.flock``, released when its process ends) is
:func:`moma.utils.locks.exclusive`; this module names the lock files of a compare folder.
"""

from __future__ import annotations

from pathlib import Path

from moma.utils.locks import exclusive

__all__ = ["LOCK_DIR", "exclusive", "lock_path"]

LOCK_DIR = "locks"


def lock_path(out: Path, *parts: str) -> Path:
    """``OUT/locks/<parts joined by '__'>.lock``."""
    return out / LOCK_DIR / ("__".join(parts) + ".lock")
