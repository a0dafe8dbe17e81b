"""benchmarks/semi_answer.py: Holm's correction by hand, the method chosen on validation (never on
test), paired differences against none and FixMatch, and the goal's verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import load_script

semi_answer = load_script("semi_answer", "benchmarks")


def test_holm_by_hand():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04); NaN is not counted
    assert semi_answer.holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, np.nan, 0.04], nan_ok=True)
    # monotone: a larger raw p never gets a smaller adjusted one
    assert semi_answer.holm([0.001, 0.3, 0.2]) == pytest.approx([0.003, 0.4, 0.4])


def _results(val_gain_kd: float, test_gain_kd: float, val_gain_crd: float, test_gain_crd: float) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for fold in range(3):
        for seed in range(3):
            noise = rng.normal(0, 0.002)
            base = {"setting": "s", "fold": fold, "seed": seed, "status": "done"}
            rows.append({**base, "size": "all", "method": "none", "best_macro_f1": 0.85, "val_macro_f1": 0.85})
            rows.append({**base, "size": "2", "method": "none", "best_macro_f1": 0.70 + noise, "val_macro_f1": 0.70})
            rows.append({**base, "size": "2", "method": "fixmatch+rest", "best_macro_f1": 0.72 + noise,
                         "val_macro_f1": 0.72})
            rows.append({**base, "size": "2", "method": "kd+rest", "best_macro_f1": 0.70 + test_gain_kd + 2 * noise,
                         "val_macro_f1": 0.70 + val_gain_kd + noise})
            rows.append({**base, "size": "2", "method": "crd+rest", "best_macro_f1": 0.70 + test_gain_crd + noise,
                         "val_macro_f1": 0.70 + val_gain_crd + noise})
    return pd.DataFrame(rows)


def test_the_method_is_chosen_on_validation_and_compared_with_none_and_fixmatch():
    # crd is better on test, kd on validation: kd must be chosen
    frame = semi_answer.answer_rows(_results(0.10, 0.08, 0.05, 0.20), gap=0.05)
    row = frame.iloc[0]
    assert row["method"] == "kd+rest" and row["gap"] == pytest.approx(0.15, abs=0.01)
    assert row["none_test"] == pytest.approx(0.08, abs=0.005) and row["none_test_low"] > 0
    assert row["fixmatch_test"] == pytest.approx(0.06, abs=0.005)
    assert row["goal_applies"] and row["goal_met"]
    assert "kd+rest" in semi_answer.answer_table(frame)


def test_the_goal_is_not_met_when_fixmatch_is_as_good():
    frame = semi_answer.answer_rows(_results(0.02, 0.02, 0.0, 0.0), gap=0.05)
    row = frame.iloc[0]
    assert abs(row["fixmatch_test"]) < 0.005 and row["fixmatch_test_low"] < 0 and not row["goal_met"]


def test_the_weak_view_probe_joins_its_main_setting_as_a_candidate():
    results = _results(0.02, 0.02, 0.0, 0.0)
    probe = results[(results["method"] == "kd+rest")].assign(setting="s_weak", val_macro_f1=0.80, best_macro_f1=0.78)
    merged = semi_answer.merge_view_probe(pd.concat([results, probe]), "s_weak")
    assert "kd-weakview+rest" in set(merged.loc[merged["setting"] == "s", "method"])
    row = semi_answer.answer_rows(merged, gap=0.05).iloc[0]
    assert row["method"] == "kd-weakview+rest"  # the best on validation, compared with FixMatch of the same pool
    assert row["fixmatch_test"] == pytest.approx(0.06, abs=0.005)
