"""Classification metrics, all computed by scikit-learn.

Cohen's kappa is reported plain and quadratic-weighted: several datasets of the paper (Gleason
grading) are ordinal, where the weighted kappa is the usual figure; it is also computed for nominal
tasks, where it is only meaningful if the class order is.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

# The headline metrics, every one "higher is better": what runs report, what a run may select its
# best epoch by (train.select_metric) and what the comparison grid tabulates.
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "qwk", "auc")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                 "kappa": "kappa", "qwk": "QWK", "auc": "AUC"}


def _auc(targets: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_classes == 2:
            return float(skm.roc_auc_score(targets, probs[:, 1]))
        # one-vs-rest, macro over the classes present in the targets
        cols = probs[:, present]
        cols = cols / np.clip(cols.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return float(skm.roc_auc_score(targets == present[1], cols[:, 1]))
        return float(skm.roc_auc_score(targets, cols, multi_class="ovr", average="macro", labels=present))


def compute_metrics(targets, probs, class_names: list[str]) -> dict:
    """Every metric of a run from integer targets (N,) and class probabilities (N, C)."""
    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=float)
    num_classes = len(class_names)
    labels = list(range(num_classes))
    preds = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision/recall on absent classes count as 0
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            targets, preds, labels=labels, zero_division=0
        )
        kappa = skm.cohen_kappa_score(targets, preds, labels=labels)
        qwk = skm.cohen_kappa_score(targets, preds, labels=labels, weights="quadratic")
        balanced = skm.balanced_accuracy_score(targets, preds)
    return {
        "num_samples": int(len(targets)),
        "accuracy": float(skm.accuracy_score(targets, preds)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(skm.f1_score(targets, preds, labels=labels, average="macro", zero_division=0)),
        "kappa": _nan_to_zero(kappa),
        "qwk": _nan_to_zero(qwk),
        "auc": _auc(targets, probs, num_classes),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": skm.confusion_matrix(targets, preds, labels=labels).tolist(),
        "class_names": list(class_names),
    }


def _nan_to_zero(value: float) -> float:
    """sklearn returns NaN kappa when both raters use one class only; that is chance agreement."""
    return 0.0 if np.isnan(value) else float(value)


def summary(metrics: dict) -> dict[str, float]:
    """The headline scalar metrics only."""
    return {key: metrics[key] for key in METRICS if key in metrics}
