"""Patient holdout for the same-task setting: the teacher learns from some patients of the target
data set, the students are trained and tested on the others only.

The split is by the ``group`` column (patients), stratified by label as far as the groups allow
(scikit-learn's ``StratifiedGroupKFold``), and seeded, so it is the same on every re-run. Each
part is written as a manifest CSV (paths relative to the manifest) that the runs read as their
``data.source``; the source data is not touched.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from moma.data.tiles import scan_tiles
from moma.errors import ConfigError
from moma.utils.io import atomic_write_text


def teacher_groups(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The patient ids of the teacher's part: one fold of a stratified grouped k-fold with
    k = round(1 / fraction) (or the complement of one fold when the fraction is above one half)."""
    unique = np.unique(groups)
    minority = min(fraction, 1.0 - fraction)
    n_splits = int(min(len(unique), max(2, round(1.0 / minority))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes with fewer patients than folds
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, fold = next(splitter.split(np.zeros(len(labels)), labels, groups))
    picked = np.unique(groups[fold])
    return picked if fraction <= 0.5 else np.setdiff1d(unique, picked)


def write_holdout_manifests(source: str | Path, out_dir: Path, name: str, fraction: float, seed: int,
                            classes: list[str] | None = None, group_column: str | None = "group",
                            unit: str = "patient") -> tuple[Path, Path]:
    """Write ``<name>-teacher.csv`` and ``<name>-student.csv`` under ``out_dir``; returns both paths.

    ``unit="tile"`` treats every tile as its own group (for data that publishes no patient ids);
    the manifests then carry no group column, so the students' folds are by tile as well."""
    table = scan_tiles(source, classes, group_column)
    if unit == "patient" and not table.has_groups:
        raise ConfigError(f"teachers.{name}.holdout: data source {source} has no '{group_column}' column of "
                          "patient ids, so its patients cannot be held out (set holdout_unit: tile to hold "
                          "out single tiles instead)")
    frame = table.frame
    by_tile = unit == "tile"
    groups = (frame["path"] if by_tile else frame["group"]).astype(str).to_numpy()
    if len(np.unique(groups)) < 2:
        raise ConfigError(f"teachers.{name}.holdout: data source {source} has fewer than 2 patients")
    chosen = teacher_groups(frame["target"].to_numpy(), groups, fraction, seed)
    is_teacher = np.isin(groups, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, mask in (("teacher", is_teacher), ("student", ~is_teacher)):
        path = out_dir / f"{name}-{part}.csv"
        rel = [os.path.relpath(p, out_dir.resolve()) for p in frame["path"][mask]]
        columns = {"path": rel, "label": frame["label"][mask].to_numpy()}
        if not by_tile:
            columns[group_column or "group"] = groups[mask]
        manifest = pd.DataFrame(columns)
        atomic_write_text(path, manifest.to_csv(index=False))
        paths.append(path)
    return paths[0], paths[1]
