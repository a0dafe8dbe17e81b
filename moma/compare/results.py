"""``results.csv``: one row per cell, read back from the cells' run folders (the source of truth,
so a re-run reports every finished cell, not only the ones it trained)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from moma.compare.config import ALL, CompareConfig
from moma.compare.grid import EXTERNAL_DIR, Cell, GridRun
from moma.compare.status import DONE, NOT_APPLICABLE, failure_rows
from moma.errors import DataError
from moma.engine.layout import ENVIRONMENT_NAME, EVAL_TAG, METRICS_NAME, report_file
from moma.metrics import METRICS

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


def _prefixed_metrics(values: dict | None, prefix: str) -> dict[str, float]:
    """``{prefix}_{metric}`` for every metric (NaN where missing)."""
    values = values or {}
    return {f"{prefix}_{m}": float(values.get(m, NAN)) for m in METRICS}


def _test_metrics(results: dict, tag: str) -> dict[str, float]:
    return _prefixed_metrics((results.get(tag) or {}).get("test"), tag)


def _validation_metrics(results: dict) -> dict[str, float]:
    """The best-by-validation model's validation metrics (what model and method choices may use)."""
    return _prefixed_metrics((results.get("best") or {}).get("val"), "val")


def _method_diagnostics(results: dict) -> dict[str, float]:
    """The last epoch's mean of every term the method logged (losses and diagnostics such as MoMA's
    nce, nce_chance, nce_retrieval), as ``diag_<term>``; the loss and the timings are left out."""
    history = results.get("history") or []
    last = history[-1] if history else {}
    return {f"diag_{k.removeprefix('train_')}": float(v) for k, v in last.items()
            if k.startswith("train_") and k != "train_loss"}


def _external_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / EXTERNAL_DIR / report_file("metrics", EVAL_TAG)
    return _prefixed_metrics(json.loads(path.read_text()) if path.is_file() else None, "ext")


def cell_row(cfg: CompareConfig, out: Path, cell: Cell, status: str, message: str) -> dict:
    run_dir = out / cell.rel_dir
    metrics_path = run_dir / METRICS_NAME
    if metrics_path.is_file() and status != NOT_APPLICABLE:
        status = DONE
    row = {"setting": cell.setting, "method": cell.method, "distill_method": cfg.registered_name(cell.method),
           "teacher": cfg.settings[cell.setting].teacher or "", "size": cell.size or ALL, "fold": cell.fold,
           "seed": cell.seed, "status": status, "best_epoch": math.nan, "epochs": math.nan}
    results = json.loads(metrics_path.read_text()) if status == DONE else {}
    row.update(best_epoch=results.get("best_epoch", NAN), epochs=results.get("epochs", NAN))
    train_tiles = (results.get("data") or {}).get("train", NAN)
    row.update(train_tiles=train_tiles, train_tiles_per_class=train_tiles / max(1, len(results.get("classes") or [])),
               optimizer_steps=results.get("optimizer_steps", NAN))
    row.update(_test_metrics(results, "best"))
    row.update(_test_metrics(results, "last"))
    row.update(_validation_metrics(results))
    row.update(_method_diagnostics(results))
    if any(setting.external_test for setting in cfg.settings.values()):
        row.update(_external_metrics(run_dir))
    environment = run_dir / ENVIRONMENT_NAME
    row["device"] = json.loads(environment.read_text()).get("device", "") if status == DONE and environment.is_file() else ""
    step = results.get("step_time") or {}
    row.update({
        "train_seconds": results.get("train_seconds", NAN),
        "images_per_second": step.get("images_per_second", NAN),
        "data_wait_ms": step.get("data_wait_ms", NAN),
        "forward_backward_ms": step.get("forward_backward_ms", NAN),
        "distill_extras_ms": step.get("distill_extras_ms", NAN),
        "peak_memory_mb": results.get("peak_memory_mb", NAN),
        "extra_parameters": (results.get("setup") or {}).get("extra_parameters", NAN),
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
