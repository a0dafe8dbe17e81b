"""The status of a grid cell, as written in results.csv, and which rows count as failures."""

from __future__ import annotations

import pandas as pd

DONE, FAILED, NOT_APPLICABLE, PENDING = "done", "failed", "not_applicable", "pending"
STATUSES = (DONE, FAILED, NOT_APPLICABLE, PENDING)


def failure_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Cells that failed, or finished with a problem (e.g. in the external test)."""
    return results[(results["status"] == FAILED) | ((results["status"] == DONE) & (results["message"] != ""))]
