"""Classification metrics, all computed by scikit-learn, and the one registry of their names.

Every headline metric is registered here once, with its label and its function of (integer
targets, class probabilities, class names); a plugin adds one with :func:`register_metric` and
runs report it, ``train.select_metric`` accepts it and the grid's ``results.csv`` gets its columns.

Cohen's kappa is reported plain and quadratic-weighted: several datasets of the paper (Gleason
grading) are ordinal, where the weighted kappa is the usual figure; it is also computed for nominal
tasks, where it is only meaningful if the class order is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

MetricFn = Callable[[np.ndarray, np.ndarray, list[str]], float]


@dataclass(frozen=True)
class Metric:
    """A headline metric, "higher is better": ``fn(targets (N,), probs (N, C), class_names)``."""

    name: str
    label: str
    fn: MetricFn


_METRICS: dict[str, Metric] = {}

# The metric that picks a run's best epoch by default and that the comparison grid ranks,
# pairs and draws learning curves by.
PRIMARY_METRIC = "macro_f1"
# The metrics the grid's tables show, and the second one its paired comparison tests.
TABLE_METRICS = ("accuracy", PRIMARY_METRIC, "kappa")
PAIRED_METRICS = (PRIMARY_METRIC, "accuracy")


def register_metric(name: str, label: str, fn: MetricFn) -> MetricFn:
    """Make ``fn`` a headline metric under ``name`` (shown as ``label``); returns ``fn``."""
    if not name.isidentifier():
        raise ValueError(f"metric name {name!r} must be an identifier (it becomes column names such as best_{name})")
    if name in _METRICS and _METRICS[name].fn is not fn:
        raise ValueError(f"metric '{name}' is registered twice")
    _METRICS[name] = Metric(name, label, fn)
    return fn


def metric_names() -> tuple[str, ...]:
    """Every headline metric: what runs report, what ``train.select_metric`` may name and what the
    comparison grid tabulates."""
    return tuple(_METRICS)


def metric_label(name: str) -> str:
    """How tables and plots name ``name``; an unregistered name (a run written with a plugin that is
    not loaded now) is shown as it is."""
    return _METRICS[name].label if name in _METRICS else name


def _preds(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=1)


def _labels(class_names: list[str]) -> list[int]:
    return list(range(len(class_names)))


def _accuracy(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    return float(skm.accuracy_score(targets, _preds(probs)))


def _balanced_accuracy(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class predicted but absent from the targets
        return float(skm.balanced_accuracy_score(targets, _preds(probs)))


def _macro_f1(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    return float(skm.f1_score(targets, _preds(probs), labels=_labels(class_names), average="macro", zero_division=0))


def _kappa(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _nan_to_zero(skm.cohen_kappa_score(targets, _preds(probs), labels=_labels(class_names)))


def _qwk(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _nan_to_zero(skm.cohen_kappa_score(targets, _preds(probs), labels=_labels(class_names),
                                                  weights="quadratic"))


def _auc(targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> float:
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(class_names) == 2:
            return float(skm.roc_auc_score(targets, probs[:, 1]))
        # one-vs-rest, macro over the classes present in the targets
        cols = probs[:, present]
        cols = cols / np.clip(cols.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return float(skm.roc_auc_score(targets == present[1], cols[:, 1]))
        return float(skm.roc_auc_score(targets, cols, multi_class="ovr", average="macro", labels=present))


def _nan_to_zero(value: float) -> float:
    """sklearn returns NaN kappa when both raters use one class only; that is chance agreement."""
    return 0.0 if np.isnan(value) else float(value)


register_metric("accuracy", "accuracy", _accuracy)
register_metric("balanced_accuracy", "balanced accuracy", _balanced_accuracy)
register_metric("macro_f1", "macro F1", _macro_f1)
register_metric("kappa", "kappa", _kappa)
register_metric("qwk", "QWK", _qwk)
register_metric("auc", "AUC", _auc)


def compute_metrics(targets, probs, class_names: list[str]) -> dict:
    """Every registered metric of a run from integer targets (N,) and class probabilities (N, C),
    with per-class precision, recall and F1 and the confusion matrix."""
    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=float)
    labels, preds = _labels(class_names), _preds(probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision/recall on absent classes count as 0
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            targets, preds, labels=labels, zero_division=0
        )
    return {
        "num_samples": int(len(targets)),
        **{m.name: float(m.fn(targets, probs, list(class_names))) for m in _METRICS.values()},
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": skm.confusion_matrix(targets, preds, labels=labels).tolist(),
        "class_names": list(class_names),
    }


def summary(metrics: dict) -> dict[str, float]:
    """The headline scalar metrics only."""
    return {key: metrics[key] for key in metric_names() if key in metrics}
