"""What a run folder holds: the name of every file, in one place for everything that writes or
reads one (the trainer, inference, the CLI's summary, the comparison grid)."""

from __future__ import annotations

CONFIG_NAME = "config.yaml"
ENVIRONMENT_NAME = "environment.json"
LOG_NAME = "train.log"
SPLIT_NAME = "split.csv"
STATE_NAME = "state.pt"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
HISTORY_NAME = "history.csv"  # one row per epoch; earlier versions wrote it as summary.csv
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"

# Reports of one model on one split: metrics_<tag>.json, confusion_<tag>.csv/.png, predictions_<tag>.csv.
TEST_BEST_TAG = "test_best"  # the best-by-validation model on the test split
EVAL_TAG = "eval"  # `moma evaluate`
REPORT_PATTERNS = {"metrics": "metrics_{}.json", "confusion_csv": "confusion_{}.csv", "confusion_png": "confusion_{}.png",
                   "predictions": "predictions_{}.csv"}


def report_file(kind: str, tag: str) -> str:
    """The file name of one report (``kind``: a key of REPORT_PATTERNS) for ``tag``."""
    return REPORT_PATTERNS[kind].format(tag)
