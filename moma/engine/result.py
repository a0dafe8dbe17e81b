"""What a finished run reports: ``metrics.json`` as a typed value, written and read here only.

The CLI's summary, the comparison grid's ``results.csv`` and its teacher check all read a run's
outcome through :class:`RunResult`, so its keys are spelled once. Reading is lenient about keys a
run of an older version did not write (they read as empty or NaN); the file itself is plain JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moma.engine.layout import METRICS_NAME
from moma.errors import DataError
from moma.metrics import PRIMARY_METRIC, metric_names
from moma.utils.io import atomic_write_json

NAN = math.nan


@dataclass
class ModelScores:
    """One model's (best-by-validation or last epoch's) metrics; ``test`` holds per-class detail too."""

    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None


@dataclass
class RunResult:
    run_dir: str
    classes: list[str]
    select_metric: str
    best_epoch: int
    epochs: int
    setup: dict[str, Any] = field(default_factory=dict)
    best: ModelScores | None = None  # None on ranks other than 0 of a multi-process run
    last: ModelScores | None = None
    train_seconds: float = NAN
    step_time: dict[str, float] = field(default_factory=dict)  # StepTimes.as_dict()
    optimizer_steps: int = 0
    peak_memory_mb: float = NAN
    data: dict[str, int] = field(default_factory=dict)  # tiles per split: train, val, test, unlabelled
    skipped_tiles: int = 0
    skipped_unlabelled_tiles: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's row of history.csv

    # ------------------------------------------------------------------ reading the numbers
    def test_metrics(self, model: str = "best") -> dict[str, float]:
        """Every headline metric of ``model`` ('best' or 'last') on test, NaN where not measured."""
        scores = getattr(self, model)
        return _headline(scores.test if scores else None)

    def val_metrics(self) -> dict[str, float]:
        """The best-by-validation model's validation metrics: what choices between models may use."""
        return _headline(self.best.val if self.best else None)

    def last_epoch_terms(self) -> dict[str, float]:
        """The last epoch's mean of every term the method logged (losses and diagnostics), without
        the ``train_`` prefix; the total loss is left out."""
        last = self.history[-1] if self.history else {}
        return {k.removeprefix("train_"): float(v) for k, v in last.items() if k.startswith("train_") and k != "train_loss"}

    @property
    def train_tiles_per_class(self) -> float:
        return self.data.get("train", NAN) / max(1, len(self.classes))

    # ------------------------------------------------------------------ the file
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / METRICS_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResult:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        for model in ("best", "last"):
            if isinstance(kept.get(model), dict):
                kept[model] = ModelScores(**{k: v for k, v in kept[model].items() if k in ("val", "test")})
        kept.setdefault("run_dir", "")
        kept.setdefault("classes", [])
        kept.setdefault("select_metric", PRIMARY_METRIC)
        kept.setdefault("best_epoch", 0)
        kept.setdefault("epochs", 0)
        return cls(**kept)

    @classmethod
    def read(cls, run_dir: Path) -> RunResult:
        path = Path(run_dir) / METRICS_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(f"{path} not found: the run has not finished (resume it with --resume)") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"{path} is not a run's metrics file ({exc}); was it edited by hand?") from None


def _headline(values: dict[str, Any] | None) -> dict[str, float]:
    values = values or {}
    return {m: float(values.get(m, NAN)) for m in metric_names()}
