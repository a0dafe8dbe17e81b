"""``results.csv``: one row per cell, read back from the cells' run folders (the source of truth,
so a re-run reports every finished cell, not only the ones it trained)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from moma.compare.config import ALL, CompareConfig
from moma.compare.grid import EXTERNAL_DIR, GridRun
from moma.compare.plan import Cell
from moma.compare.status import DONE, NOT_APPLICABLE, failure_rows
from moma.errors import DataError
from moma.engine.layout import ENVIRONMENT_NAME, EVAL_TAG, METRICS_NAME, report_file
from moma.engine.result import RunResult
from moma.metrics import metric_names

RESULTS_NAME = "results.csv"
COST_COLUMNS = ["train_seconds", "images_per_second", "data_wait_ms", "forward_backward_ms", "distill_extras_ms",
                "peak_memory_mb", "extra_parameters"]
NAN = float("nan")


def read_results(compare_dir: Path) -> pd.DataFrame:
    """A compare folder's results.csv (sizes kept as text: '8', 'all'); a one-line error if absent."""
    path = Path(compare_dir) / RESULTS_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run moma compare (or --report-only) on that folder first")
    return pd.read_csv(path, dtype={"size": str})


def _prefixed(values: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in values.items()}


def _external_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / EXTERNAL_DIR / report_file("metrics", EVAL_TAG)
    values = json.loads(path.read_text()) if path.is_file() else {}
    return {f"ext_{m}": float(values.get(m, NAN)) for m in metric_names()}


def cell_row(cfg: CompareConfig, out: Path, cell: Cell, status: str, message: str) -> dict:
    run_dir = out / cell.rel_dir
    metrics_path = run_dir / METRICS_NAME
    if metrics_path.is_file() and status != NOT_APPLICABLE:
        status = DONE
    row = {"setting": cell.setting, "method": cell.method, "distill_method": cfg.registered_name(cell.method),
           "teacher": cfg.settings[cell.setting].teacher or "", "size": cell.size or ALL, "fold": cell.fold,
           "seed": cell.seed, "status": status}
    done = status == DONE
    result = RunResult.read(run_dir) if done else RunResult.from_dict({})
    row.update(best_epoch=result.best_epoch if done else NAN, epochs=result.epochs if done else NAN,
               train_tiles=result.data.get("train", NAN), train_tiles_per_class=result.train_tiles_per_class,
               optimizer_steps=result.optimizer_steps if done else NAN)
    row.update(_prefixed(result.test_metrics("best"), "best"))
    row.update(_prefixed(result.test_metrics("last"), "last"))
    row.update(_prefixed(result.val_metrics(), "val"))  # what model and method choices may use
    row.update(_prefixed(result.last_epoch_terms(), "diag"))  # losses and diagnostics such as MoMA's nce
    if any(setting.external_test for setting in cfg.settings.values()):
        row.update(_external_metrics(run_dir))
    environment = run_dir / ENVIRONMENT_NAME
    row["device"] = json.loads(environment.read_text()).get("device", "") if done and environment.is_file() else ""
    step = result.step_time
    row.update({
        "train_seconds": result.train_seconds,
        "images_per_second": step.get("images_per_second", NAN),
        "data_wait_ms": step.get("data_wait_ms", NAN),
        "forward_backward_ms": step.get("forward_backward_ms", NAN),
        "distill_extras_ms": step.get("distill_extras_ms", NAN),
        "peak_memory_mb": result.peak_memory_mb,
        "extra_parameters": result.setup.get("extra_parameters", NAN),
        "run_dir": cell.rel_dir.as_posix() if run_dir.is_dir() else "",
        "message": message,
    })
    return row


def build_results(cfg: CompareConfig, out: Path, run: GridRun) -> pd.DataFrame:
    rows = [cell_row(cfg, out, cell, run.outcomes[cell].status, run.outcomes[cell].message) for cell in run.cells]
    return pd.DataFrame(rows)


def failures(results: pd.DataFrame) -> pd.DataFrame:
    """Cells that failed, or finished with a problem (e.g. in the external test)."""
    return failure_rows(results)[["setting", "method", "fold", "seed", "status", "message", "run_dir"]]
