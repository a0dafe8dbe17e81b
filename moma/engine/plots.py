"""PNG plots of a run: confusion matrix and training curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moma.utils.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
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
    _save(fig, path)


def plot_curves(history: pd.DataFrame, path: Path, metric: str = "macro_f1") -> None:
    """Loss and validation metrics per epoch from a run's summary.csv."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    if "val_loss" in history:
        left.plot(history["epoch"], history["val_loss"], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    for key in ("val_accuracy", f"val_{metric}", "val_kappa"):
        if key in history and not (key == f"val_{metric}" and metric == "accuracy"):
            right.plot(history["epoch"], history[key], marker="o", label=key.removeprefix("val_"))
    right.set_ylim(min(0.0, float(np.nanmin(history.filter(like="val_kappa").to_numpy(), initial=0))), 1.0)
    right.set_xlabel("epoch")
    right.set_title("validation")
    right.legend()
    fig.tight_layout()
    _save(fig, path)
