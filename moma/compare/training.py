"""One training run of the grid in its fixed folder: skipped when finished, resumed when
interrupted, started afresh otherwise (teachers and cells alike)."""

from __future__ import annotations

import shutil
from pathlib import Path

from moma.config import Config
from moma.engine.layout import LAST_NAME, METRICS_NAME, STATE_NAME


def _clear_unfinished(run_dir: Path) -> None:
    """Remove a run folder that holds neither a finished result nor a resumable state (a run that
    failed before its first epoch ended): nothing in it can be reused."""
    if run_dir.is_dir() and not (run_dir / METRICS_NAME).exists() and not (run_dir / STATE_NAME).exists():
        shutil.rmtree(run_dir)


def train_or_resume(cfg: Config, run_dir: Path, keep_state: bool = True) -> str:
    """Train into ``run_dir`` unless finished; continue it if interrupted. Returns what was done.
    Without ``keep_state`` the training state and the last-epoch weights of a run that finishes
    here are deleted (its metrics are in metrics.json; best.safetensors stays)."""
    from moma.engine.runs import run_training

    if (run_dir / METRICS_NAME).is_file():
        return "skipped"
    _reset_peak_memory()
    try:
        if (run_dir / STATE_NAME).is_file():
            run_training(cfg, resume_dir=run_dir)
            done = "resumed"
        else:
            _clear_unfinished(run_dir)
            run_training(cfg, run_dir=run_dir)
            done = "trained"
    finally:
        _release_memory()
    if not keep_state and (run_dir / METRICS_NAME).is_file():
        (run_dir / STATE_NAME).unlink(missing_ok=True)
        (run_dir / LAST_NAME).unlink(missing_ok=True)
    return done


def _reset_peak_memory() -> None:
    """Runs share the grid's process: without a reset, CUDA's peak would be the grid's so far."""
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
