"""Run folders: one per run, never overwritten, holding everything needed to reproduce it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from moma.config import Config
from moma.engine.checkpoint import versions
from moma.engine.layout import CONFIG_NAME, ENVIRONMENT_NAME, LOG_NAME
from moma.utils.io import atomic_write_json, atomic_write_text



def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """A new folder ``output_dir/name`` (or ``name-2``, ``name-3``, ... if taken). Creation with
    ``exist_ok=False`` makes the choice race-free between concurrent runs."""
    base = Path(output_dir)
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = base / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir(exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {base} for {name!r}")


def write_run_info(run_dir: Path, cfg: Config, extra: dict | None = None) -> None:
    atomic_write_text(run_dir / CONFIG_NAME, cfg.to_yaml())
    info = {"command": " ".join(sys.argv), "versions": versions(), **(extra or {})}
    atomic_write_json(run_dir / ENVIRONMENT_NAME, info)


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
