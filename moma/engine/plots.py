"""PNG plots of a run (confusion matrix and training curves), and the one helper that saves a
figure: every module that draws imports ``plt`` and :func:`save_figure` from here, so the
backend (Agg, no display needed) is chosen once."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moma.metrics import PRIMARY_METRIC, TABLE_METRICS, metric_label  # noqa: E402
from moma.utils.io import atomic_path  # noqa: E402

__all__ = ["plot_confusion", "plot_curves", "plt", "save_figure"]


def save_figure(fig: Figure, path: Path, dpi: int = 130) -> None:
    """Write ``fig`` to ``path`` as a PNG cropped to its content, whole or not at all, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion(matrix, class_names: list[str], path: Path, title: str = "Confusion matrix") -> None:
    matrix = np.asarray(matrix, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = max(3.5, 0.7 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}\n{normalised[i, j]:.0%}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def plot_curves(history: pd.DataFrame, path: Path, metric: str = PRIMARY_METRIC) -> None:
    """Loss and validation metrics (the tables' metrics and ``metric``) per epoch from a run's history."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    if "val_loss" in history:
        left.plot(history["epoch"], history["val_loss"], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    shown = [f"val_{name}" for name in dict.fromkeys((*TABLE_METRICS, metric)) if f"val_{name}" in history]
    for key in shown:
        right.plot(history["epoch"], history[key], marker="o", label=metric_label(key.removeprefix("val_")))
    right.set_ylim(min(0.0, float(np.nanmin(history[shown].to_numpy(dtype=float), initial=0))), 1.0)
    right.set_xlabel("epoch")
    right.set_title("validation")
    right.legend()
    fig.tight_layout()
    save_figure(fig, path)
