"""Train/val/test splits that never put one patient on both sides.

Tiles of one patient are strongly correlated; a split by tile inflates every metric. When the
table has a ``group`` column, every split here keeps each group whole (scikit-learn's
``StratifiedGroupKFold``, stratified as far as the groups allow). Without groups, splits are
stratified by label. The split is written as ``split.csv`` in the run folder and reused on resume
and evaluation, so test tiles never leak into training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from moma.data.tiles import SPLITS, TileTable
from moma.errors import DataError
from moma.utils.io import atomic_write_text

SPLIT_COLUMNS = ["rel_path", "label", "group", "split"]
# Training tiles left out of a labelled subset (moma.data.subsample): in split.csv, in no part.
UNUSED = "unused"


def _folds(labels: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> list[np.ndarray]:
    """Indices of each of ``n_splits`` disjoint, label-stratified (and group-respecting) folds."""
    n_units = len(np.unique(groups)) if groups is not None else len(labels)
    n_splits = max(2, min(n_splits, n_units))
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; that is expected on small data.
        warnings.simplefilter("ignore", UserWarning)
        if groups is not None:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]
        min_count = np.bincount(labels).min()
        if min_count >= n_splits:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    order = np.random.default_rng(seed).permutation(len(labels))
    return list(np.array_split(order, n_splits))


def _holdout(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Indices of a held-out part of roughly ``fraction`` of the rows."""
    if fraction <= 0:
        return np.array([], dtype=int)
    return _folds(labels, groups, int(round(1.0 / fraction)), seed)[0]


def _assign(n: int, test_idx: np.ndarray, val_idx: np.ndarray) -> np.ndarray:
    split = np.full(n, "train", dtype=object)
    split[val_idx] = "val"
    split[test_idx] = "test"
    return split


def _val_from_rest(table: TileTable, rest: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    labels = table.frame["target"].to_numpy()
    groups = table.frame["group"].to_numpy() if table.has_groups else None
    sub_groups = groups[rest] if groups is not None else None
    return rest[_holdout(labels[rest], sub_groups, val_fraction, seed + 1)]


def split_table(table: TileTable, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """A train/val/test assignment for every tile (the manifest's own split wins if it has one)."""
    frame = table.frame
    if table.has_split:
        split = frame["split"].to_numpy().astype(object)
        if not (split == "val").any():
            train_idx = np.flatnonzero(split == "train")
            split[_val_from_rest(table, train_idx, val_fraction, seed)] = "val"
    else:
        labels = frame["target"].to_numpy()
        groups = frame["group"].to_numpy() if table.has_groups else None
        test_idx = _holdout(labels, groups, test_fraction, seed)
        rest = np.setdiff1d(np.arange(len(frame)), test_idx)
        rel_val = val_fraction / max(1e-9, 1.0 - test_fraction)
        val_idx = _val_from_rest(table, rest, rel_val, seed)
        split = _assign(len(frame), test_idx, val_idx)
    return _as_split_frame(table, split)


def kfold_split(table: TileTable, num_folds: int, fold: int, val_fraction: float, seed: int) -> pd.DataFrame:
    """Fold ``fold`` of a grouped, stratified K-fold: that fold is the test set; validation tiles are
    drawn (by group) from the remaining folds. The same seed gives the same folds for every method."""
    labels = table.frame["target"].to_numpy()
    groups = table.frame["group"].to_numpy() if table.has_groups else None
    folds = _folds(labels, groups, num_folds, seed)
    if fold >= len(folds):
        raise DataError(f"data.fold={fold}: only {len(folds)} folds are possible with this data")
    test_idx = folds[fold]
    rest = np.setdiff1d(np.arange(len(labels)), test_idx)
    rel_val = val_fraction / max(1e-9, 1.0 - 1.0 / len(folds))
    val_idx = _val_from_rest(table, rest, rel_val, seed + 1000 * (fold + 1))
    return _as_split_frame(table, _assign(len(labels), test_idx, val_idx))


def _as_split_frame(table: TileTable, split: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame({"rel_path": table.frame["rel_path"], "label": table.frame["label"], "split": split})
    out.insert(2, "group", table.frame["group"].to_numpy() if table.has_groups else "")
    for name in ("train", "val"):
        if not (out["split"] == name).any():
            raise DataError(f"the {name} split is empty: use more data or change data.val_fraction/test_fraction")
    return out


def check_no_leakage(split: pd.DataFrame) -> None:
    """Raise if one group (patient) appears in more than one split."""
    grouped = split[(split["group"] != "") & (split["split"] != UNUSED)]
    if grouped.empty:
        return
    sides = grouped.groupby("group")["split"].nunique()
    leaking = sides[sides > 1]
    if not leaking.empty:
        raise DataError(f"split leaks patients across splits: {', '.join(map(str, leaking.index[:5]))}")


def save_split(split: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, split[SPLIT_COLUMNS].to_csv(index=False))


def load_split(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"rel_path", "split"} - set(frame.columns)
    if missing:
        raise DataError(f"split file {path}: missing column(s) {', '.join(sorted(missing))}")
    if not frame["split"].isin((*SPLITS, UNUSED)).all():
        raise DataError(f"split file {path}: the split column may only hold {', '.join((*SPLITS, UNUSED))}")
    if "group" not in frame.columns:
        frame["group"] = ""
    return frame


def apply_split(table: TileTable, split: pd.DataFrame) -> dict[str, TileTable]:
    """The train/val/test sub-tables of ``table`` as assigned by a split frame."""
    lookup = dict(zip(split["rel_path"], split["split"]))
    assigned = table.frame["rel_path"].map(lookup)
    if assigned.isna().any():
        missing = table.frame["rel_path"][assigned.isna()].iloc[0]
        raise DataError(f"tile {missing} is not in the saved split; the data changed since the split was made")
    return {name: table.subset((assigned == name).to_numpy()) for name in SPLITS}
