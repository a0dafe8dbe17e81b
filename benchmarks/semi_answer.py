"""The answer table that opens BENCHMARKS.md: does distillation help, with the user's unlabelled
tiles and without them? Read from a compare folder whose config has an unlabelled pool
(configs/compare/semi.yaml); nothing is trained.

    python benchmarks/semi_answer.py runs/compare/semi [--weak-setting same_scratch_weak]

Per setting and size:
- the labels-only student (``none``) and its gap to its own all-label score;
- the distillation method with the pool chosen on **validation** (highest mean validation macro F1
  among the teacher-based pool entries other than the ``pseudo`` baseline): its paired difference
  against ``none`` and against FixMatch with the same pool, on test and on validation (mean
  [95 % t-interval], Wilcoxon p, and the p-value after Holm's correction over every test-set
  comparison in the table);
- whether the goal holds: where ``none`` is at least ``--gap`` below its all-label score, the chosen
  method beats ``none`` and FixMatch with a 95 % interval above 0 on test and on validation.
With ``--weak-setting``, the student's view is decided on validation: the same method with the
strong view (the main setting) against the weak view (that setting), paired by fold and seed, and
the probe's entries join the main setting's candidates ('<method>-weakview+<pool>').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from moma.compare.config import POOL_SEPARATOR
from moma.compare.report_tables import _ci, _p
from moma.compare.results import read_results
from moma.compare.stats import PAIR_KEYS, done_rows, paired_difference, paired_differences
from moma.errors import DataError

BASELINE_NAMES = ("none", "fixmatch", "pseudo")  # not distillation methods: the comparisons' baselines
COLUMNS = {"test": "best_macro_f1", "val": "val_macro_f1"}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), np.nan)
    order = finite[np.argsort(p[finite])]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def pool_entries(methods: pd.Series) -> list[str]:
    return [m for m in methods.drop_duplicates() if POOL_SEPARATOR in m]


def choose_on_validation(done: pd.DataFrame, setting: str, size: str) -> str | None:
    """The teacher-based pool entry with the highest mean validation macro F1 (never test)."""
    here = done[(done["setting"] == setting) & (done["size"] == size)]
    candidates = [m for m in pool_entries(here["method"]) if m.split(POOL_SEPARATOR)[0] not in BASELINE_NAMES]
    if not candidates:
        return None
    means = {m: here.loc[here["method"] == m, COLUMNS["val"]].mean() for m in candidates}
    return max(means, key=means.get)


def _fixmatch_with_pool(method: str) -> str:
    return f"fixmatch{POOL_SEPARATOR}{method.split(POOL_SEPARATOR)[1]}"


def answer_rows(results: pd.DataFrame, gap: float) -> pd.DataFrame:
    done = done_rows(results)
    rows = []
    for setting in done["setting"].drop_duplicates():
        here = done[done["setting"] == setting]
        ceiling = here.loc[(here["method"] == "none") & (here["size"] == "all"), COLUMNS["test"]].mean()
        for size in here["size"].drop_duplicates():
            chosen = choose_on_validation(done, setting, size)
            if chosen is None:
                continue
            none = here.loc[(here["method"] == "none") & (here["size"] == size), COLUMNS["test"]].mean()
            if not np.isfinite(none):
                continue  # no labels-only student to compare with in this setting
            row = {"setting": setting, "size": size, "none": none, "gap": ceiling - none, "method": chosen}
            for baseline, tag in (("none", "none"), (_fixmatch_with_pool(chosen), "fixmatch")):
                for split, column in COLUMNS.items():
                    result = paired_difference(paired_differences(results, setting, chosen, baseline, column, size))
                    row.update({f"{tag}_{split}": result.mean, f"{tag}_{split}_low": result.ci_low,
                                f"{tag}_{split}_high": result.ci_high, f"{tag}_{split}_p": result.p_value,
                                f"{tag}_pairs": result.n})
            row["goal_applies"] = bool(np.isfinite(row["gap"]) and row["gap"] >= gap)
            row["goal_met"] = all(row[f"{tag}_{split}_low"] > 0 for tag in ("none", "fixmatch") for split in COLUMNS)
            rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        adjusted = holm(frame["none_test_p"].tolist() + frame["fixmatch_test_p"].tolist())
        frame["none_test_p_holm"] = adjusted[:len(frame)]
        frame["fixmatch_test_p_holm"] = adjusted[len(frame):]
    return frame


def _delta(row: pd.Series, key: str, holm_key: str | None = None) -> str:
    mean, low, high, p = row[key], row[f"{key}_low"], row[f"{key}_high"], row[f"{key}_p"]
    text = _ci(mean, low, high)
    text = f"**{text}**" if low > 0 else text
    text += f", p = {_p(p)}"
    return text + (f" (Holm {_p(row[holm_key])})" if holm_key else "")


def answer_table(frame: pd.DataFrame) -> str:
    lines = ["| setting | labelled tiles per class | none: test macro F1 (gap to all labels) | with the pool, chosen on "
             "validation | Δ test vs none | Δ validation vs none | Δ test vs FixMatch (same pool) | Δ validation vs "
             "FixMatch | goal |", "|---|---|---|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        goal = ("met" if row["goal_met"] else "not met") if row["goal_applies"] else "n/a (gap < threshold)"
        lines.append(
            f"| {row['setting']} | {row['size']} | {row['none']:.3f} ({row['gap']:+.3f}) | {row['method']} | "
            f"{_delta(row, 'none_test', 'none_test_p_holm')} | {_delta(row, 'none_val')} | "
            f"{_delta(row, 'fixmatch_test', 'fixmatch_test_p_holm')} | {_delta(row, 'fixmatch_val')} | {goal} |")
    return "\n".join(lines)


def merge_view_probe(results: pd.DataFrame, weak_setting: str) -> pd.DataFrame:
    """The weak-view probe's entries as candidates of its main setting: '<method>+<pool>' of
    ``<main>_weak`` becomes '<method>-weakview+<pool>' of ``<main>`` (same folds, seeds and labelled
    subsets, so the pairs stay paired), to be chosen on validation like any other entry."""
    main_setting = weak_setting.removesuffix("_weak")
    merged = results.copy()
    probe = merged["setting"] == weak_setting
    base, _, pool = merged.loc[probe, "method"].str.partition(POOL_SEPARATOR).T.values
    merged.loc[probe, "method"] = [f"{b}-weakview{POOL_SEPARATOR}{q}" if q else f"{b}-weakview" for b, q in zip(base, pool)]
    merged.loc[probe, "setting"] = main_setting
    return merged


def view_table(results: pd.DataFrame, strong_setting: str, weak_setting: str) -> str:
    """Strong minus weak student view, same method and pool, paired by (fold, seed), on validation and test."""
    done = done_rows(results)
    weak = done[done["setting"] == weak_setting]
    lines = [f"| size | method | Δ validation ({strong_setting} − {weak_setting}) | Δ test |", "|---|---|---|---|"]
    for (size, method), part in weak.groupby(["size", "method"], sort=False):
        strong = done[(done["setting"] == strong_setting) & (done["size"] == size) & (done["method"] == method)]
        cells = []
        for column in (COLUMNS["val"], COLUMNS["test"]):
            pairs = strong[PAIR_KEYS + [column]].merge(part[PAIR_KEYS + [column]], on=PAIR_KEYS, suffixes=("_s", "_w"))
            result = paired_difference((pairs[f"{column}_s"] - pairs[f"{column}_w"]).to_numpy(dtype=float))
            cells.append(f"{_ci(result.mean, result.ci_low, result.ci_high)}, p = {_p(result.p_value)}, n = {result.n}")
        lines.append(f"| {size} | {method} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("--gap", type=float, default=0.05, help="labels-only gap to its all-label score at which "
                        "the goal applies (default 0.05 macro F1)")
    parser.add_argument("--weak-setting", help="a setting that differs from its namesake without '_weak' only by "
                        "the student's view")
    args = parser.parse_args(argv)
    try:
        results = read_results(args.compare_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frame = answer_rows(merge_view_probe(results, args.weak_setting) if args.weak_setting else results, args.gap)
    if frame.empty:
        print(f"error: {args.compare_dir}: results.csv has no finished cell with an unlabelled pool "
              f"('<method>{POOL_SEPARATOR}<pool>')", file=sys.stderr)
        return 2
    print(answer_table(frame))
    if args.weak_setting:
        strong = args.weak_setting.removesuffix("_weak")
        print(f"\nStudent view, {strong} against {args.weak_setting}:\n")
        print(view_table(results, strong, args.weak_setting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
