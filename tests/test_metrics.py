import numpy as np
import pytest
from sklearn import metrics as skm

from moma.metrics import compute_metrics


def test_hand_made_example():
    # 6 tiles, 3 classes; predictions: argmax of these probabilities
    targets = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],  # 0 correct
        [0.2, 0.7, 0.1],  # 0 -> 1
        [0.1, 0.8, 0.1],  # 1 correct
        [0.1, 0.6, 0.3],  # 1 correct
        [0.1, 0.2, 0.7],  # 2 correct
        [0.6, 0.2, 0.2],  # 2 -> 0
    ])
    m = compute_metrics(targets, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1 by hand: a: P=1/2 R=1/2 -> 0.5; b: P=2/3 R=1 -> 0.8; c: P=1 R=1/2 -> 2/3
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # kappa by hand: p_o = 4/6; predicted counts (2, 3, 1), true counts (2, 2, 2): p_e = (4 + 6 + 2) / 36
    p_o, p_e = 4 / 6, 12 / 36
    assert m["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    preds = probs.argmax(1)
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(targets, preds, weights="quadratic"))
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(targets, probs, multi_class="ovr"))


def test_binary_auc_uses_positive_column_and_random_data_matches_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 50)
    probs = rng.dirichlet([1, 1], 50)
    m = compute_metrics(targets, probs, ["neg", "pos"])
    assert m["auc"] == pytest.approx(skm.roc_auc_score(targets, probs[:, 1]))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(targets, probs.argmax(1), average="macro"))


def test_class_absent_from_targets_does_not_crash():
    m = compute_metrics([0, 0, 1], np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]), ["a", "b", "c"])
    assert m["per_class"]["c"]["support"] == 0 and np.isfinite(m["auc"])


def test_one_list_of_metric_names_for_runs_selection_and_the_grid():
    from moma.config import build_config
    from moma.engine.result import ModelScores, RunResult
    from moma.metrics import metric_names, summary

    metrics = compute_metrics([0, 1, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], ["a", "b"])
    assert set(summary(metrics)) == set(metric_names())
    assert metrics["balanced_accuracy"] == 0.75  # recall 1.0 on a, 0.5 on b
    for name in metric_names():
        assert build_config({"train": {"select_metric": name}}).train.select_metric == name
    result = RunResult(run_dir="r", classes=["a", "b"], select_metric="qwk", best_epoch=1, epochs=1,
                       best=ModelScores(test=metrics))
    assert result.test_metrics()["qwk"] == metrics["qwk"] and set(result.test_metrics()) == set(metric_names())


def test_an_unknown_select_metric_is_refused_with_the_registered_names():
    from moma.config import build_config
    from moma.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown metric 'f1'; choose one of: accuracy, balanced_accuracy, macro_f1"):
        build_config({"train": {"select_metric": "f1"}})


def test_a_metric_name_is_registered_once(monkeypatch):
    from moma import metrics

    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))
    with pytest.raises(ValueError, match="registered twice"):
        metrics.register_metric("accuracy", "accuracy", lambda t, p, c: 0.0)
    with pytest.raises(ValueError, match="must be an identifier"):
        metrics.register_metric("top-2", "top 2", lambda t, p, c: 0.0)
