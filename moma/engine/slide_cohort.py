"""The table of a cohort of predicted slides, and resuming it slide by slide.

``slides.csv`` holds one row per slide: ``status`` ``done`` with tissue area, tiles, class
fractions, mean probabilities and how the slide was read, or ``skipped`` with a one-line
``reason``. It is rewritten (atomically) after every slide, so it is also the record a re-run
resumes from: a slide whose row says ``done`` and whose files are all there is not predicted again.
``prediction.json`` records the model (a SHA-256 of its file) and the settings that change the
numbers; a re-run with another model or other settings into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from moma.data.tiling import TilePlan
from moma.engine.layout import BEST_NAME
from moma.errors import ConfigError
from moma.utils.io import atomic_path, atomic_write_json

SLIDES_NAME = "slides.csv"
OLD_SLIDES_NAME = "summary.csv"  # what earlier versions called it: a folder they wrote still resumes
PARAMS_NAME = "prediction.json"
DONE, SKIPPED = "done", "skipped"
_LEADING = ["slide", "status", "tiles", "unreadable", "tissue_mm2", "slide_mpp", "level", "level_mpp", "model_mpp", "scale"]
_TRAILING = ["seconds", "data_wait", "reason", "path"]
_INTEGERS = ("tiles", "unreadable", "level")


def summary_columns(names: list[str]) -> list[str]:
    return _LEADING + [f"fraction_{n}" for n in names] + [f"mean_prob_{n}" for n in names] + _TRAILING


def model_file(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path / BEST_NAME if path.is_dir() else path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_rows(out_dir: Path, params: dict) -> dict[str, dict]:
    """The summary rows a re-run into ``out_dir`` may keep (by slide id); refuses a folder that
    holds another model's or other settings' predictions. Records ``params`` for the next run."""
    params_file = out_dir / PARAMS_NAME
    summary = next((p for p in (out_dir / SLIDES_NAME, out_dir / OLD_SLIDES_NAME) if p.is_file()), None)
    if params_file.is_file():
        saved = json.loads(params_file.read_text())
        changed = next((key for key in params if saved.get(key) != params[key]), None)
        if changed is not None:
            what = "model" if changed == "model_sha256" else f"{changed} ({saved.get(changed)} there, {params[changed]} now)"
            raise ConfigError(f"--out {out_dir} holds predictions made with another {what}; use another --out")
        if summary is not None:
            frame = pd.read_csv(summary, dtype={"slide": str, "status": str, "path": str, "reason": str})
            frame["reason"] = frame["reason"].fillna("").astype(str)
            return {row["slide"]: row for row in frame.to_dict("records")}
        return {}
    atomic_write_json(params_file, params)
    return {}


def finished(row: dict | None, path: Path, outputs: list[Path]) -> bool:
    """Whether a slide is done: its row says so, for this file, and all its outputs exist."""
    return (row is not None and row.get("status") == DONE and Path(str(row.get("path"))).resolve() == path.resolve()
            and all(output.is_file() for output in outputs))


def write_summary(out_dir: Path, rows: dict[str, dict], names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows.values()), columns=summary_columns(names))
    for column in _INTEGERS:
        frame[column] = pd.to_numeric(frame[column]).round().astype("Int64")
    frame["reason"] = frame["reason"].fillna("")
    with atomic_path(out_dir / SLIDES_NAME) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def done_row(plan: TilePlan, frame: pd.DataFrame, names: list[str], unreadable: int, reason: str, seconds: float,
             data_wait: float) -> dict:
    """Tissue area (mm^2) of the predicted tiles, the fraction of it predicted as each class, the
    mean probability of each class over the tiles, and how the slide was read: its level-0 um/px,
    the pyramid level and that level's um/px, and the scale from the level's pixels to the
    model's (below 1 shrunk, above 1 upsampled)."""
    tile_mm2 = (frame["size"].to_numpy(dtype=float) * plan.slide_mpp / 1000) ** 2
    area = tile_mm2 * frame["tissue"].to_numpy(dtype=float)
    total = float(area.sum())
    row = {"slide": plan.slide_id, "status": DONE, "tiles": len(frame), "unreadable": unreadable,
           "tissue_mm2": round(total, 4), "slide_mpp": round(plan.slide_mpp, 4), "level": plan.level,
           "level_mpp": round(plan.level_mpp, 4), "model_mpp": plan.mpp, "scale": round(plan.scale, 4)}
    for name in names:
        share = float(area[(frame["prediction"] == name).to_numpy()].sum()) / total if total > 0 else 0.0
        row[f"fraction_{name}"] = round(share, 4)
        row[f"mean_prob_{name}"] = round(float(frame[f"prob_{name}"].mean()), 4) if len(frame) else np.nan
    return {**row, "seconds": round(seconds, 2), "data_wait": round(data_wait, 4), "reason": reason,
            "path": str(plan.slide)}


def skipped_row(slide: str, path: Path, reason: str) -> dict:
    return {"slide": slide, "status": SKIPPED, "reason": reason, "path": str(path)}
