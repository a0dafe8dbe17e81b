"""The report's PNG plots: bars of the paired metrics, accuracy against training time, summed
confusion matrices and learning curves, each drawn from the results and summary frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moma.compare.config import POOL_SEPARATOR
from moma.compare.stats import t_interval
from moma.compare.status import DONE
from moma.engine.layout import TEST_BEST_TAG, report_file
from moma.engine.plots import plt, save_figure
from moma.metrics import PAIRED_METRICS, metric_label


def _colours(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_bars(summary: pd.DataFrame, settings: list[str], methods: list[str], path: Path) -> None:
    """Mean ± std of the paired metrics (macro F1 and accuracy), one panel per setting."""
    colours = _colours(methods)
    fig, axes = plt.subplots(len(PAIRED_METRICS), len(settings), figsize=(1.2 + 3.4 * len(settings), 6.4), squeeze=False, sharey="row")
    for col, setting in enumerate(settings):
        part = summary[summary["setting"] == setting].set_index("method").reindex(methods)
        x = np.arange(len(methods))
        for row, metric in enumerate(PAIRED_METRICS):
            ax = axes[row][col]
            means = part[f"{metric}_mean"].to_numpy(dtype=float)
            ax.bar(x, np.nan_to_num(means), yerr=part[f"{metric}_std"].fillna(0.0).to_numpy(), capsize=4,
                   color=[colours[m] for m in methods])
            for i in np.flatnonzero(~np.isfinite(means)):
                ax.text(x[i], 0.02, "n/a", ha="center", va="bottom", fontsize=9, color="#666")
            ax.set_xticks(x, methods, rotation=30, ha="right")
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(setting)
            if col == 0:
                ax.set_ylabel(f"test {metric_label(metric)} (mean ± std)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_time_scatter(results: pd.DataFrame, methods: list[str], settings: list[str], path: Path) -> None:
    """Test accuracy against training time, one point per finished cell."""
    colours = _colours(methods)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    done = results[results["status"] == DONE]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s_index, setting in enumerate(settings):
        for method in methods:
            part = done[(done["setting"] == setting) & (done["method"] == method)]
            if len(part):
                ax.scatter(part["train_seconds"], part["best_accuracy"], color=colours[method],
                           marker=markers[s_index % len(markers)], alpha=0.8, label=f"{setting} / {method}")
    ax.set_xlabel("training time per run (s)")
    ax.set_ylabel("test accuracy (best-by-validation model)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def summed_confusion(out: Path, results: pd.DataFrame, setting: str, method: str) -> tuple[np.ndarray, list[str]] | None:
    """The test confusion matrices of a method's finished cells, summed over folds x seeds."""
    rows = results[(results["setting"] == setting) & (results["method"] == method) & (results["status"] == DONE)]
    total, names = None, None
    for run_dir in rows["run_dir"]:
        path = out / run_dir / report_file("confusion_csv", TEST_BEST_TAG)
        if not path.is_file():
            continue
        frame = pd.read_csv(path, index_col=0)
        total = frame.to_numpy() if total is None else total + frame.to_numpy()
        names = [c.removeprefix("pred_") for c in frame.columns]
    return None if total is None else (total, names)


def curve_points(results: pd.DataFrame, setting: str, method: str, metric: str = "best_macro_f1") -> pd.DataFrame:
    """Per size of one setting: x = mean labelled training tiles per class used (the same subsets for
    every method), and the method's mean and 95% CI half-width of ``metric``."""
    done = results[(results["setting"] == setting) & (results["status"] == "done")]
    rows = []
    for size, part in done.groupby("size", sort=False):
        x = float(part["train_tiles_per_class"].mean())
        values = part.loc[part["method"] == method, metric].to_numpy(dtype=float)
        mean, half = t_interval(values[np.isfinite(values)])
        if np.isfinite(x) and np.isfinite(mean):
            rows.append({"size": size, "x": x, "mean": mean, "half": half})
    return pd.DataFrame(rows, columns=["size", "x", "mean", "half"]).sort_values("x")


def curve_style(method: str, colours: dict[str, tuple]) -> dict:
    """A method entry's line: the colour of its method; dashed, and named so, with an unlabelled pool."""
    base, _, pool = method.partition(POOL_SEPARATOR)
    if not pool:
        return {"color": colours[base], "label": method, "linestyle": "-"}
    return {"color": colours[base], "label": f"{base} with unlabelled tiles ({pool})", "linestyle": "--"}


def plot_learning_curve(results: pd.DataFrame, setting: str, methods: list[str], path: Path, title: str) -> bool:
    """Test macro F1 against labelled tiles per class (log x), mean and 95% CI band per method; a
    method run with an unlabelled pool is drawn dashed in its method's colour."""
    colours = _colours(list(dict.fromkeys(m.partition(POOL_SEPARATOR)[0] for m in methods)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    ticks: set[float] = set()
    for method in methods:
        points = curve_points(results, setting, method)
        if points.empty:
            continue
        drawn = True
        ticks.update(points["x"].round(1))
        x, mean, half = points["x"].to_numpy(), points["mean"].to_numpy(), points["half"].to_numpy()
        style = curve_style(method, colours)
        ax.plot(x, mean, marker="o", **style)
        band = np.isfinite(half)
        if band.any():
            ax.fill_between(x[band], (mean - half)[band], (mean + half)[band], color=style["color"], alpha=0.15)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("labelled training tiles per class (log scale)")
    ax.set_ylabel("test macro F1 (mean, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True
