"""Labelled subsets of the training split (learning curves): stratified counts, whole patients,
determinism, nesting, and one subset for every method of a cell."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import make_tile_folder, tiny_config
from moma.data.splits import UNUSED, kfold_split, load_split, save_split
from moma.data.subsample import subsample_train
from moma.data.tiles import scan_tiles
from moma.engine.builder import make_split
from moma.errors import DataError


def train_class_counts(split: pd.DataFrame) -> dict[str, int]:
    """Training tiles per class of a split."""
    return {str(k): int(v) for k, v in split.loc[split["split"] == "train", "label"].value_counts().sort_index().items()}


def frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """(label, group, split) rows -> a split frame."""
    return pd.DataFrame({"rel_path": [f"t{i}.png" for i in range(len(rows))], "label": [r[0] for r in rows],
                         "group": [r[1] for r in rows], "split": [r[2] for r in rows]})


def no_groups(n_a: int, n_b: int, n_val: int = 3) -> pd.DataFrame:
    rows = [("a", "", "train")] * n_a + [("b", "", "train")] * n_b + [("a", "", "val")] * n_val + [("b", "", "test")] * 2
    return frame(rows)


def test_without_groups_exact_counts_per_class_and_val_test_untouched():
    split = no_groups(30, 12)
    out = subsample_train(split, seed=0, per_class=5)
    assert train_class_counts(out) == {"a": 5, "b": 5}
    assert (out["split"] == UNUSED).sum() == 30 + 12 - 10
    untouched = split["split"] != "train"
    assert out.loc[untouched, "split"].equals(split.loc[untouched, "split"])
    # a class with fewer tiles than asked keeps all of them
    assert train_class_counts(subsample_train(split, seed=0, per_class=20)) == {"a": 20, "b": 12}


def test_fraction_rounds_up_per_class():
    out = subsample_train(no_groups(30, 12), seed=1, fraction=0.25)
    assert train_class_counts(out) == {"a": 8, "b": 3}  # ceil(7.5), ceil(3.0)


def test_same_seed_same_subset_other_seed_other_subset_and_nested():
    split = no_groups(40, 40)
    a = subsample_train(split, seed=3, per_class=8)
    assert a.equals(subsample_train(split, seed=3, per_class=8))
    assert not a["split"].equals(subsample_train(split, seed=4, per_class=8)["split"])
    small = set(a.loc[a["split"] == "train", "rel_path"])
    big = subsample_train(split, seed=3, per_class=16)
    assert small < set(big.loc[big["split"] == "train", "rel_path"])


def test_whole_patients_are_kept_and_every_class_reaches_its_target():
    # 6 patients of class a with 5 tiles each, 4 of class b with 3 tiles, one mixed patient (2 a + 2 b)
    rows = [("a", f"pa{p}", "train") for p in range(6) for _ in range(5)]
    rows += [("b", f"pb{p}", "train") for p in range(4) for _ in range(3)]
    rows += [("a", "mix", "train")] * 2 + [("b", "mix", "train")] * 2 + [("a", "pv", "val")] * 4
    split = frame(rows)
    for seed in range(10):
        out = subsample_train(split, seed=seed, per_class=7)
        train = out[out["split"].isin(["train", UNUSED])]
        assert (train.groupby("group")["split"].nunique() == 1).all(), "a patient was cut in two"
        counts = train_class_counts(out)
        assert counts["a"] >= 7 and counts["b"] >= 7
        # never more patients than needed: removing the last patient taken would leave a class short
        kept = out.loc[out["split"] == "train", "group"].unique()
        assert len(kept) <= 2 + 3 + 1
        assert out.loc[out["group"] == "pv", "split"].eq("val").all()


def test_bad_sizes_are_refused():
    with pytest.raises(DataError, match="train_fraction"):
        subsample_train(no_groups(4, 4), seed=0, fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        subsample_train(no_groups(4, 4), seed=0)


def test_run_split_is_subsampled_saved_and_reloaded_identically(tmp_path):
    """Through a run's config: every method of a cell (same seed, fold, size) gets the same subset,
    the saved split.csv records it, and a resume reads it back unchanged."""
    source = make_tile_folder(tmp_path / "d", per_class=24, patients_per_class=8)
    table = scan_tiles(source)

    def cell(method: str):
        return tiny_config(tmp_path, source, data={"num_folds": 3, "fold": 1, "train_per_class": 4},
                           distill={"method": method})

    none_split, moma_split = make_split(cell("none"), table), make_split(cell("moma"), table)
    assert none_split.equals(moma_split)
    full = kfold_split(table, 3, 1, cell("none").data.val_fraction, 0)
    assert none_split.loc[none_split["split"] != UNUSED, "split"].equals(full.loc[none_split["split"] != UNUSED, "split"])
    assert (full.loc[none_split["split"] == UNUSED, "split"] == "train").all()
    assert all(n >= 4 for n in train_class_counts(none_split).values())
    assert (none_split.groupby("group")["split"].nunique() == 1).all()
    save_split(none_split, tmp_path / "split.csv")
    assert load_split(tmp_path / "split.csv")["split"].tolist() == none_split["split"].tolist()
    resumed = make_split(cell("none"), table, saved_split=tmp_path / "split.csv")
    assert resumed["split"].tolist() == none_split["split"].tolist()
