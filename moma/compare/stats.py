"""Statistics of a finished grid: mean ± std per setting x method, ranks, and paired tests of each
method against the vanilla student on the same folds and seeds.

The paired comparison follows the usual practice for cross-validated classifiers (Demšar,
"Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7, 2006): the unit is one
(fold, seed) pair run by both methods, the effect is the mean paired difference with a Student-t
confidence interval, and the Wilcoxon signed-rank test gives a p-value that does not assume
normality. Ranks per setting (1 = best) and their average over settings are Demšar's summary for
many methods on several tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from moma.compare.status import DONE, NOT_APPLICABLE

PAIR_KEYS = ["fold", "seed"]


def done_rows(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["status"] == DONE]


def group_keys(frame: pd.DataFrame) -> list[str]:
    """Methods are compared within a setting and, on a learning curve, within one training-set size."""
    return [key for key in ("setting", "size") if key in frame.columns]


def summarize(results: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per (setting[, size], method) in the order they first appear: ``n`` finished cells and the
    mean and sample standard deviation (ddof=1; NaN for a single run) of each column."""
    by = group_keys(results) + ["method"]
    done = done_rows(results)
    keys = results[by].drop_duplicates()
    grouped = done.groupby(by, sort=False)
    table = grouped[columns].agg(["mean", "std"])
    table.columns = [f"{column}_{stat}" for column, stat in table.columns]
    table.insert(0, "n", grouped.size())
    out = keys.merge(table.reset_index(), on=by, how="left")
    out["n"] = out["n"].fillna(0).astype(int)
    return out.reset_index(drop=True)


def add_ranks(summary: pd.DataFrame, column: str = "macro_f1_mean") -> pd.DataFrame:
    """``rank`` of each method within its setting (and size) by ``column`` (1 = highest; ties share
    the mean rank; methods without results get no rank)."""
    out = summary.copy()
    out["rank"] = out.groupby(group_keys(out), sort=False)[column].rank(ascending=False, method="average")
    return out


def average_ranks(ranked: pd.DataFrame) -> pd.DataFrame:
    """Mean rank of each method over the settings where it has results, and in how many it has."""
    grouped = ranked.dropna(subset=["rank"]).groupby("method", sort=False)["rank"]
    table = pd.DataFrame({"average_rank": grouped.mean(), "settings": grouped.size()}).reset_index()
    return table.sort_values(["average_rank", "method"], kind="stable").reset_index(drop=True)


@dataclass
class PairedResult:
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero (no evidence of a
    difference; scipy refuses that case) and NaN below two pairs."""
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return float("nan")
    if np.all(differences == 0):
        return 1.0
    return float(scipy_stats.wilcoxon(differences).pvalue)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    r"""Mean and the half-width of its Student-t confidence interval,
    :math:`t_{(1+c)/2,\,n-1} \, s / \sqrt{n}` (``s`` the sample standard deviation). NaN half-width
    below two values, NaN mean for none."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan")
    if n < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))


def paired_difference(differences: np.ndarray, confidence: float = 0.95) -> PairedResult:
    """Mean of paired differences with its t confidence interval (:func:`t_interval`) and the
    Wilcoxon signed-rank p-value. Below two pairs the interval and the p-value are NaN."""
    d = np.asarray(differences, dtype=float)
    mean, half = t_interval(d, confidence)
    if len(d) < 2:
        return PairedResult(len(d), mean, float("nan"), float("nan"), float("nan"))
    return PairedResult(len(d), mean, mean - half, mean + half, wilcoxon_p(d))


def paired_differences(results: pd.DataFrame, setting: str, method: str, baseline: str, column: str,
                       size: str | None = None) -> np.ndarray:
    """``method - baseline`` on every (fold, seed) both finished with a finite value, in key order
    (within one training-set size when ``size`` is given)."""
    done = done_rows(results)
    here = done[done["setting"] == setting]
    if size is not None:
        here = here[here["size"] == size]
    a = here[here["method"] == method][PAIR_KEYS + [column]]
    b = here[here["method"] == baseline][PAIR_KEYS + [column]]
    pairs = a.merge(b, on=PAIR_KEYS, suffixes=("_m", "_b")).sort_values(PAIR_KEYS)
    pairs = pairs[np.isfinite(pairs[f"{column}_m"]) & np.isfinite(pairs[f"{column}_b"])]
    return (pairs[f"{column}_m"] - pairs[f"{column}_b"]).to_numpy(dtype=float)


def compare_with_baseline(results: pd.DataFrame, baseline: str, columns: list[str]) -> pd.DataFrame:
    """One row per (setting, method != baseline): n pairs and, per column, the mean paired
    difference, its 95% CI and the Wilcoxon p-value."""
    rows = []
    keys = group_keys(results)
    for group, part in results.groupby(keys, sort=False):
        setting, size = (group if len(keys) == 2 else (group[0] if isinstance(group, tuple) else group, None))
        methods = part["method"].drop_duplicates()
        if baseline not in set(methods):
            continue
        for method in methods:
            statuses = set(part[part["method"] == method]["status"])
            if method == baseline or statuses == {NOT_APPLICABLE}:
                continue
            row: dict = {"setting": setting, **({"size": size} if size is not None else {}), "method": method,
                         "baseline": baseline}
            for column in columns:
                result = paired_difference(paired_differences(results, setting, method, baseline, column, size))
                row.setdefault("pairs", result.n)
                row.update({f"delta_{column}": result.mean, f"delta_{column}_ci_low": result.ci_low,
                            f"delta_{column}_ci_high": result.ci_high, f"delta_{column}_p": result.p_value})
            rows.append(row)
    return pd.DataFrame(rows)


def verdict(low: float, high: float, n: int) -> str:
    """'beats' only where the whole confidence interval is above zero."""
    if n < 2 or not np.isfinite(low):
        return f"has too few paired runs (n = {n}) for a confidence interval against"
    if low > 0:
        return "beats"
    if high < 0:
        return "is worse than"
    return "shows no clear difference from"
