"""Tables of the "MoMA for any teacher" study (configs/compare/moma_any.yaml), read from its compare
folder; nothing is trained.

    python benchmarks/moma_any_tables.py runs/compare/moma_any

Three tables, every difference paired by fold and seed (mean [95 % t-interval], Wilcoxon p):
1. per setting and size, each method's test and validation macro F1 and its difference to the
   labels-only student (``none``) on test and on validation, with the contrastive diagnostics of
   the last epoch (L_NCE as a share of its chance level, in-batch retrieval, the agreement of the
   student's keys with the teacher's) where the method has them;
2. the control: each method with the trained teacher (``other_arch``) against the same method with
   a teacher of random weights (``random_teacher``), on validation and test, and the key agreement
   of both;
3. per setting, the method with the highest mean validation macro F1 (the choice; test is never
   used to choose), and whether its lead over the runner-up has an interval above 0 (else: within
   noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from moma.compare.report_tables import _ci as report_ci, _p as report_p
from moma.compare.results import read_results
from moma.compare.stats import PAIR_KEYS, done_rows, paired_difference, paired_differences
from moma.errors import DataError

TEST, VAL = "best_macro_f1", "val_macro_f1"
REAL, CONTROL = "other_arch", "random_teacher"


def _ci(result) -> str:
    """A paired difference as the report writes it: mean [95 % interval], Wilcoxon p."""
    text = report_ci(result.mean, result.ci_low, result.ci_high)
    return text if not np.isfinite(result.ci_low) else f"{text}, p = {report_p(result.p_value)}"


def _diagnostics(part: pd.DataFrame) -> str:
    if "diag_nce" not in part or not part["diag_nce"].notna().any():
        return "-"
    share = (part["diag_nce"] / part["diag_nce_chance"]).mean()
    text = f"{share:.2f} of chance, retrieval {part['diag_nce_retrieval'].mean():.2f}"
    if "diag_nce_agreement" in part and part["diag_nce_agreement"].notna().any():
        text += f", agreement {part['diag_nce_agreement'].mean():.3f}"
    return text


def method_table(results: pd.DataFrame, setting: str) -> str:
    done = done_rows(results)
    here = done[done["setting"] == setting]
    lines = ["| size | method | runs | test macro F1 | Δ test vs none | Δ validation vs none | L_NCE, retrieval, agreement |",
             "|---|---|---|---|---|---|---|"]
    for size in here["size"].drop_duplicates():
        for method in here.loc[here["size"] == size, "method"].drop_duplicates():
            part = here[(here["size"] == size) & (here["method"] == method)]
            deltas = ["-", "-"]
            if method != "none" and ((here["method"] == "none") & (here["size"] == size)).any():
                deltas = [_ci(paired_difference(paired_differences(results, setting, method, "none", col, size)))
                          for col in (TEST, VAL)]
            lines.append(f"| {size} | {method} | {len(part)} | {part[TEST].mean():.3f} ± {part[TEST].std():.3f} | "
                         f"{deltas[0]} | {deltas[1]} | {_diagnostics(part)} |")
    return "\n".join(lines)


def control_table(results: pd.DataFrame) -> str:
    done = done_rows(results)
    control = done[done["setting"] == CONTROL]
    lines = ["| size | method | Δ validation (trained − random teacher) | Δ test | key agreement: trained / random |",
             "|---|---|---|---|---|"]
    for (size, method), part in control.groupby(["size", "method"], sort=False):
        if method == "none":
            continue
        real = done[(done["setting"] == REAL) & (done["size"] == size) & (done["method"] == method)]
        cells = []
        for column in (VAL, TEST):
            pairs = real[PAIR_KEYS + [column]].merge(part[PAIR_KEYS + [column]], on=PAIR_KEYS, suffixes=("_r", "_c"))
            cells.append(_ci(paired_difference((pairs[f"{column}_r"] - pairs[f"{column}_c"]).to_numpy(dtype=float))))
        agreement = "-"
        if "diag_nce_agreement" in part and part["diag_nce_agreement"].notna().any():
            agreement = f"{real['diag_nce_agreement'].mean():.3f} / {part['diag_nce_agreement'].mean():.3f}"
        lines.append(f"| {size} | {method} | {cells[0]} | {cells[1]} | {agreement} |")
    return "\n".join(lines)


def choice_table(results: pd.DataFrame) -> str:
    """Per setting and size, the best method on validation and its lead over the runner-up."""
    done = done_rows(results)
    lines = ["| setting | size | best on validation | validation macro F1 | lead over the runner-up (validation) | verdict |",
             "|---|---|---|---|---|---|"]
    for setting in done["setting"].drop_duplicates():
        here = done[done["setting"] == setting]
        for size in here["size"].drop_duplicates():
            means = here[here["size"] == size].groupby("method")[VAL].mean().sort_values(ascending=False)
            if len(means) < 2:
                continue
            best, runner = means.index[0], means.index[1]
            lead = paired_difference(paired_differences(results, setting, best, runner, VAL, size))
            verdict = "ahead" if lead.ci_low > 0 else "within noise"
            lines.append(f"| {setting} | {size} | {best} | {means.iloc[0]:.3f} | vs {runner}: {_ci(lead)} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        results = read_results(args.compare_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for setting in done_rows(results)["setting"].drop_duplicates():
        print(f"#### {setting}\n\n{method_table(results, setting)}\n")
    print(f"#### The control: trained against random-weight teacher\n\n{control_table(results)}\n")
    print(f"#### The choice, on validation\n\n{choice_table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
