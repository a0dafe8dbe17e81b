import pandas as pd
import pytest

from conftest import make_tile_folder
from moma.data.splits import apply_split, check_no_leakage, kfold_split, load_split, save_split, split_table
from moma.data.tiles import scan_tiles
from moma.errors import DataError


@pytest.fixture
def table(tmp_path):
    return scan_tiles(make_tile_folder(tmp_path / "d", per_class=30, patients_per_class=6))


def test_split_keeps_every_patient_on_one_side(table):
    split = split_table(table, 0.2, 0.2, seed=0)
    sides = split.groupby("group")["split"].nunique()
    assert (sides == 1).all()
    check_no_leakage(split)
    assert set(split["split"]) == {"train", "val", "test"}


def test_split_is_reproducible_and_seed_dependent(table):
    a = split_table(table, 0.2, 0.2, seed=3)
    b = split_table(table, 0.2, 0.2, seed=3)
    c = split_table(table, 0.2, 0.2, seed=4)
    assert a.equals(b)
    assert not a["split"].equals(c["split"])


def test_split_without_groups_is_stratified(tmp_path):
    table = scan_tiles(make_tile_folder(tmp_path / "d", per_class=40, manifest=False))
    split = split_table(table, 0.25, 0.25, seed=0)
    test_counts = split[split["split"] == "test"]["label"].value_counts()
    assert set(test_counts) == {10}  # 25 % of each class of 40


def test_leakage_is_detected():
    frame = pd.DataFrame({"rel_path": ["a", "b"], "label": ["x", "x"], "group": ["p1", "p1"], "split": ["train", "test"]})
    with pytest.raises(DataError, match="p1"):
        check_no_leakage(frame)


def test_kfold_test_folds_partition_the_patients(table):
    folds = [kfold_split(table, 3, k, 0.2, seed=0) for k in range(3)]
    test_sets = [set(f.loc[f["split"] == "test", "rel_path"]) for f in folds]
    assert sum(len(s) for s in test_sets) == len(table)
    assert set().union(*test_sets) == set(table.frame["rel_path"])
    for f in folds:
        check_no_leakage(f)
        assert (f["split"] == "val").any()


def test_saved_split_round_trips_and_is_applied(table, tmp_path):
    split = split_table(table, 0.2, 0.2, seed=0)
    save_split(split, tmp_path / "split.csv")
    loaded = load_split(tmp_path / "split.csv")
    assert loaded["split"].tolist() == split["split"].tolist()
    parts = apply_split(table, loaded)
    assert sum(len(p) for p in parts.values()) == len(table)
    assert set(parts["test"].frame["rel_path"]) == set(split.loc[split["split"] == "test", "rel_path"])
