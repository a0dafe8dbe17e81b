"""A labelled subset of a split's training part, for learning curves ("how many labelled tiles of my
task does a teacher save me?").

Only the ``train`` rows are touched: the rows left out are marked ``unused`` (kept in ``split.csv``
so a run folder records exactly which tiles it learnt from); validation and test stay as they are.
The subset is stratified by class and seeded. Where the split has patient ids (its ``group``
column) whole patients are taken: patients are visited in a seeded order and a patient is added
while one of its classes still has fewer tiles than the target, so every class reaches the target
(or all of its tiles) and may overshoot it by at most one patient's tiles. Without patient ids
single tiles are drawn, exactly ``per_class`` of each class, and the subset of a smaller size is
part of the subset of a larger one for the same seed (nested learning curves).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moma.data.splits import UNUSED
from moma.errors import DataError


def class_targets(counts: pd.Series, per_class: int | None, fraction: float | None) -> pd.Series:
    """Tiles wanted per class: ``per_class`` (capped at what the class has), or ``fraction`` of each
    class rounded up (at least one tile)."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    if per_class is not None:
        if per_class < 1:
            raise DataError(f"data.train_per_class={per_class}: must be at least 1")
        return counts.clip(upper=per_class)
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.train_fraction={fraction}: must be in (0, 1]")
    return counts.apply(lambda n: min(n, max(1, math.ceil(fraction * n))))


def _by_tile(train: pd.DataFrame, targets: pd.Series, rng: np.random.Generator) -> np.ndarray:
    order = train.index.to_numpy()[rng.permutation(len(train))]
    rank = train.loc[order].groupby("label", sort=False).cumcount()
    keep = rank.to_numpy() < targets.reindex(train.loc[order, "label"]).to_numpy()
    return order[keep]


def _by_group(train: pd.DataFrame, targets: pd.Series, rng: np.random.Generator) -> np.ndarray:
    groups = np.array(sorted(train["group"].astype(str).unique()))
    per_group = train.groupby(train["group"].astype(str))["label"].value_counts().unstack(fill_value=0)
    taken = pd.Series(0, index=targets.index)
    chosen: list[str] = []
    for group in groups[rng.permutation(len(groups))]:
        if (taken >= targets).all():
            break
        counts = per_group.loc[group].reindex(targets.index, fill_value=0)
        if ((counts > 0) & (taken < targets)).any():
            chosen.append(group)
            taken += counts
    return train.index[train["group"].astype(str).isin(chosen)].to_numpy()


def subsample_train(split: pd.DataFrame, seed: int, per_class: int | None = None,
                    fraction: float | None = None) -> pd.DataFrame:
    """A copy of ``split`` (columns ``rel_path, label, group, split``) whose training rows outside a
    seeded, class-stratified subset are marked ``unused``. ``group`` == "" means no patient ids."""
    out = split.copy()
    train = out[out["split"] == "train"]
    if train.empty:
        raise DataError("the train split is empty: nothing to subsample")
    targets = class_targets(train["label"].value_counts(sort=False), per_class, fraction)
    rng = np.random.default_rng(seed)
    has_groups = (train["group"].astype(str) != "").all()
    keep = _by_group(train, targets, rng) if has_groups else _by_tile(train, targets, rng)
    out.loc[train.index.difference(keep), "split"] = UNUSED
    return out
