"""One compact table per setting of a learning-curve compare folder, for BENCHMARKS.md: per method
and size, test macro F1 (mean ± std over folds x seeds), the paired difference against the
baseline on test and on validation (mean [95% t-interval], Wilcoxon p; bold where the interval lies
above 0) and the mean training wall time of a run (contended machines make it an upper bound).

    python benchmarks/curve_tables.py runs/compare/curves

It reads results.csv (written by ``moma compare`` and by ``--report-only``); nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from moma.compare.report_tables import _ci, _mean_std, _p
from moma.compare.results import read_results
from moma.compare.stats import compare_with_baseline, done_rows
from moma.errors import DataError

COLUMNS = ["best_macro_f1", "val_macro_f1"]


def _delta(row: pd.Series, column: str) -> str:
    """The report's 'mean [low, high]' (bold where low > 0), then the Wilcoxon p."""
    mean, low, high, p = (row[f"delta_{column}{suffix}"] for suffix in ("", "_ci_low", "_ci_high", "_p"))
    text = _ci(mean, low, high)
    return (f"**{text}**" if low > 0 else text) + f", p = {_p(p)}"


def setting_table(results: pd.DataFrame, paired: pd.DataFrame, setting: str, baseline: str) -> str:
    done = done_rows(results)
    lines = ["| size | method | runs | test macro F1 | Δ test vs " + baseline + " | Δ validation vs " + baseline
             + " | s per run |", "|---|---|---|---|---|---|---|"]
    here = done[done["setting"] == setting]
    for size in here["size"].drop_duplicates():
        for method in here["method"].drop_duplicates():
            cells = here[(here["size"] == size) & (here["method"] == method)]
            if cells.empty:
                continue
            runs = cells["best_macro_f1"]
            score = _mean_std(runs.mean(), runs.std())
            match = paired[(paired["setting"] == setting) & (paired["size"] == size) & (paired["method"] == method)]
            deltas = ["—", "—"] if match.empty else [_delta(match.iloc[0], column) for column in COLUMNS]
            seconds = cells["train_seconds"].mean()
            lines.append(f"| {size} | {method} | {len(runs)} | {score} | {deltas[0]} | {deltas[1]} | {seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("--baseline", default="none")
    args = parser.parse_args(argv)
    try:
        results = read_results(args.compare_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paired = compare_with_baseline(results, args.baseline, COLUMNS)
    for setting in results["setting"].drop_duplicates():
        print(f"#### {setting}\n\n{setting_table(results, paired, setting, args.baseline)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
