"""Run folders: one per run, never overwritten, holding everything needed to reproduce it.

:func:`run_training` is a run's lifecycle around the training loop: create (or reopen, to resume)
the folder, write the config, environment and split, attach the log file, train, and leave no
empty folder behind when a run fails before it starts. The files it holds are named in
:mod:`moma.engine.layout`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from moma.config import Config
from moma.engine import distributed
from moma.data.splits import save_split
from moma.engine.checkpoint import versions
from moma.engine.device import resolve_device
from moma.engine.layout import CONFIG_NAME, ENVIRONMENT_NAME, LOG_NAME, SPLIT_NAME
from moma.engine.result import RunResult
from moma.engine.trainer import Trainer
from moma.errors import MomaError
from moma.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


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


def _remove_unused_run_dir(run_dir: Path) -> None:
    """A run that failed before training leaves no empty folder behind (only its log was written)."""
    leftovers = [p.name for p in run_dir.iterdir()]
    if set(leftovers) <= {LOG_NAME}:
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()


def run_training(cfg: Config, resume_dir: Path | None = None, run_dir: Path | None = None) -> RunResult:
    """Create (or reopen) the run folder and train. Returns what metrics.json holds.

    ``resume_dir`` continues an interrupted run there; ``run_dir`` names a new, empty folder to use
    instead of one derived from run.output_dir/run.name (the comparison grid names its cells)."""
    dist = distributed.DistInfo.from_env()
    if not dist.enabled:
        return _run_training(cfg, dist, resume_dir, run_dir)
    device = resolve_device(cfg.run.device, dist.local_rank)
    distributed.init_process_group(dist, use_cuda=device.type == "cuda")
    package_log = logging.getLogger("moma")
    level = package_log.level
    if not dist.is_main:
        package_log.setLevel(logging.WARNING)  # one copy of the progress log, from rank 0
    try:
        return _run_training(cfg, dist, resume_dir, run_dir)
    except BaseException as exc:
        # The other ranks fail in their next collective (gloo: the peer is gone) or at its timeout
        # (NCCL); torchrun also stops them when this process exits non-zero.
        log.error("rank %d of %d stopped: %s: %s", dist.rank, dist.world_size, type(exc).__name__, exc)
        raise
    finally:
        package_log.setLevel(level)
        distributed.destroy_process_group(dist)


def _run_training(cfg: Config, dist: distributed.DistInfo, resume_dir: Path | None, run_dir: Path | None) -> RunResult:
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    elif run_dir is not None:
        run_dir = distributed.broadcast_run_dir(lambda: _claim_empty_dir(Path(run_dir)), dist)
    else:
        run_dir = distributed.broadcast_run_dir(lambda: create_run_dir(cfg.run.output_dir, cfg.run.name), dist)
    handler = attach_log_file(run_dir) if dist.is_main else None
    try:
        trainer = Trainer(cfg, run_dir, resume=resume_dir is not None)
    except BaseException:
        _detach(handler)
        if resume_dir is None and dist.is_main:
            _remove_unused_run_dir(run_dir)
        raise
    if dist.is_main and resume_dir is None:
        write_run_info(run_dir, cfg, {"setup": trainer.setup_info, "world_size": dist.world_size,
                                      "device": str(trainer.device)})
        save_split(trainer.data.split, run_dir / SPLIT_NAME)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        _detach(handler)


def _claim_empty_dir(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.iterdir()):
        raise MomaError(f"run folder {run_dir} is not empty; runs never overwrite each other")
    return run_dir


def _detach(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
