"""A run's teacher cache: whether a run can read its teacher from one, the cache found or made for
its tiles, refused when made otherwise, and bound to the run's batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moma.config import Config
from moma.data.transforms import training_views
from moma.distill.base import DistillMethod
from moma.engine.builder import DataBundle, Teacher
from moma.engine.teacher_cache import (DEFAULT_DIR, LOCK_NAME, Preprocessing, TeacherCache, default_name,
                                       differences, fingerprint, missing_shards, read_index, tile_keys)
from moma.engine.teacher_cache_write import write_cache
from moma.errors import ConfigError, DataError
from moma.models.taps import TapOutputs
from moma.utils.locks import exclusive

log = logging.getLogger(__name__)


@dataclass
class RunTeacherCache:
    """A cache bound to one run: batch index (training rows, then the pool's) -> cache row."""

    cache: TeacherCache
    rows: np.ndarray

    def outputs(self, index: torch.Tensor, view: torch.Tensor | None, device: torch.device) -> TapOutputs:
        if view is None:
            raise DataError("the teacher cache needs each sample's view, but the training transform drew none")
        return self.cache.outputs(self.rows[index.numpy()], view.numpy().astype(np.int64), device)


def why_not_cached(method: DistillMethod) -> str:
    """Why a method runs its live teacher, in words (for the one log line)."""
    if method.updates_teacher:
        return "it updates its teacher's weights (a momentum teacher)"
    if method.teacher_stages:
        return "it reads the teacher's intermediate feature maps"
    if method.needs_teacher_feature_map:
        return "it reads the teacher's final feature map"
    return "it runs its own teacher pass"


def usable_for_run(cfg: Config, method: DistillMethod, train_transform) -> bool:
    """Whether a run with ``distill.teacher_cache`` set can read the teacher from a cache; if not, says why once."""
    setting = cfg.distill.teacher_cache
    if not method.requires_teacher:
        log.info("distill.teacher_cache=%s: method '%s' uses no teacher; nothing to cache", setting, method.name)
        return False
    if not method.uses_cached_teacher_outputs:
        log.info("distill.teacher_cache=%s: method '%s' runs the live teacher: %s", setting, method.name,
                 why_not_cached(method))
        return False
    if not getattr(train_transform, "teacher_view_is_pure", False):
        log.info("distill.teacher_cache=%s: the teacher sees the student's augmented view (RandAugment or stain "
                 "jitter with data.strong_augment=false), which no cache holds; the live teacher runs "
                 "(data.strong_augment=true gives the teacher a pure view)", setting)
        return False
    return True


def cache_folder(cfg: Config, teacher: Teacher, wanted: dict, keys: pd.DataFrame) -> Path:
    """The folder of this run's cache: the one named, or for ``auto`` one per teacher, preprocessing
    and tile set under ``distill.teacher_cache_dir`` (default: teacher_cache/ beside run.output_dir)."""
    if cfg.distill.teacher_cache != "auto":
        return Path(cfg.distill.teacher_cache)
    parent = Path(cfg.distill.teacher_cache_dir) if cfg.distill.teacher_cache_dir else \
        Path(cfg.run.output_dir).resolve().parent / DEFAULT_DIR
    return parent / default_name(teacher, wanted, keys)


def run_preprocessing(cfg: Config, data: DataBundle) -> Preprocessing:
    return Preprocessing(cfg.data.image_size, data.stain, training_views(cfg.augment))


def open_for_run(cfg: Config, data: DataBundle, teacher: Teacher, method: DistillMethod,
                 device: torch.device) -> RunTeacherCache | None:
    """The teacher cache of this run, found or made (under a file lock: grid shards share it), its
    tiles and views checked against the run; None when the live teacher runs (said once)."""
    if cfg.distill.teacher_cache == "off" or not usable_for_run(cfg, method, data.train.transform):
        return None
    prep = run_preprocessing(cfg, data)
    paths = data.table.frame["path"].tolist() + ([] if data.unlabelled is None else list(data.unlabelled.paths))
    keys = tile_keys(paths)
    wanted = fingerprint(teacher, prep)
    folder = cache_folder(cfg, teacher, wanted, keys)
    with exclusive(folder / LOCK_NAME):
        if not _complete(folder, wanted):
            log.info("teacher cache %s: computing the teacher's outputs for %d tiles x %d views", folder, len(keys),
                     prep.stored_per_tile)
            write_cache(folder, teacher, keys, wanted, prep, device, batch_size=max(64, cfg.optim.batch_size))
    cache = TeacherCache(folder)
    _check_fingerprint(cache, wanted)
    run = RunTeacherCache(cache, np.concatenate([cache.rows(data.train.paths), _pool_rows(cache, data)]))
    _restrict_views(cache, data, run.rows, prep.views)
    log.info("teacher cache %s: the teacher's outputs are read from it (%d tiles x %d views); the teacher does "
             "not run during training", folder, cache.index["tiles"], cache.index["views_per_tile"])
    return run


def _complete(folder: Path, wanted: dict) -> bool:
    """Whether ``folder`` holds a finished cache (one of another fingerprint counts as finished: it is refused on use)."""
    index = read_index(folder) if folder.exists() else None
    if index is None:
        return False
    if index["fingerprint"] != wanted:
        return True
    return not missing_shards(folder, index)


def _pool_rows(cache: TeacherCache, data: DataBundle) -> np.ndarray:
    return np.zeros(0, dtype=np.int64) if data.unlabelled is None else cache.rows(data.unlabelled.paths)


def _check_fingerprint(cache: TeacherCache, wanted: dict) -> None:
    """Refuse a cache made otherwise; views may differ where the cache holds every view the run draws."""
    stored = cache.fingerprint
    changed = [d for d in differences(stored, wanted) if not d.startswith("view")]
    every_view = stored["views_per_tile"] == len(stored["views"])
    if every_view and not set(wanted["views"]) <= set(stored["views"]):
        changed.append(f"views {stored['views']} (this run draws {wanted['views']})")
    if not every_view and stored["views"] != wanted["views"]:
        changed.append(f"views (a subset of {stored['views_per_tile']} of {stored['views']} per tile; this run draws "
                       f"from {wanted['views']})")
    if changed:
        raise ConfigError(f"teacher cache {cache.folder} was made with other {'; '.join(changed)}; set "
                          "distill.teacher_cache=auto or another folder, or delete this one")


def _restrict_views(cache: TeacherCache, data: DataBundle, rows: np.ndarray, views: tuple[int, ...]) -> None:
    """A cache of N views per tile: each tile's training view is drawn from its N."""
    if cache.index["views_per_tile"] == len(cache.fingerprint["views"]):
        return
    num_train = len(data.train)
    data.train.view_choices = cache.views[rows[:num_train]]
    if data.unlabelled is not None:
        data.unlabelled.view_choices = cache.views[rows[num_train:]]
