"""Predicting whole slides: tissue tiles streamed through the model in batches, written per slide as
a CSV, a heatmap on the slide thumbnail and a GeoJSON of tile polygons that QuPath imports as
detections; one summary table over all slides (see ``slide_cohort``), from which a killed run
resumes slide by slide.

Tiles are read at the checkpoint's tile size (``image_size``) and resolution (``mpp``), on the same
grid and with the same tissue detection as ``moma tile``, and go through the model's own
preprocessing (``eval_transform``: its stain normalisation, mean and std). A slide scanned coarser
than the model's resolution is refused unless upsampling is allowed: the model would see detail
the scan never had. A slide that cannot be opened is skipped with its reason in the summary; a
damaged region costs its tiles, with one line per region, and the rest of the slide is predicted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from moma.data.slide_dataset import SlideTileBatches
from moma.data.slides import Slide, slide_id
from moma.data.tiling import TilePlan, check_upsampling, plan_tiles
from moma.engine.checkpoint import ModelMetadata
from moma.engine.inference import eval_transform, load_classifier
from moma.engine.slide_cohort import (DONE, SKIPPED, SLIDES_NAME, file_sha256, finished, model_file, resume_rows,
                                      skipped_row, done_row, write_summary)
from moma.engine.slide_outputs import class_colours, plot_class_map, plot_probability_map, write_geojson, write_table
from moma.engine.slide_stream import StreamResult, auto_workers, model_threads, split_for_device, stream_probs
from moma.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

__all__ = ["DONE", "SKIPPED", "SLIDES_NAME", "SlidePredictOptions", "class_colours", "predict_slides"]

HEATMAP_MAX_SIDE = 1024


@dataclass
class SlidePredictOptions:
    batch_size: int = 128
    workers: int | None = None  # reader processes; None: auto_workers()
    slide_mpp: float | None = None
    mpp: float | None = None  # overrides the checkpoint's
    allow_upsampling: bool = False
    min_tissue: float = 0.5
    heatmap_class: str | None = None
    progress: bool = True


@dataclass
class _Predictor:
    """What every slide needs: the model, its metadata and resolution, its preprocessing."""

    model: torch.nn.Module
    meta: ModelMetadata
    mpp: float
    transform: torch.nn.Module
    device: torch.device


def _model_mpp(meta: ModelMetadata, checkpoint: str | Path, override: float | None) -> float:
    if override:
        return override
    if not meta.mpp:
        raise CheckpointError(f"checkpoint {checkpoint} does not record the microns per pixel of its tiles "
                              "(trained without data.mpp); pass --model-mpp")
    return float(meta.mpp)


def predict_slides(checkpoint: str | Path, slides: list[Path], out_dir: Path, device: torch.device,
                   options: SlidePredictOptions) -> pd.DataFrame:
    """Predict every slide into ``out_dir``; returns (and writes) the summary table. Slides already
    done there by an earlier run with the same model and settings are kept, not predicted again."""
    workers = auto_workers(device) if options.workers is None else options.workers
    with model_threads(workers, device):  # before loading: an ONNX Runtime session takes torch's thread count
        model, meta = load_classifier(checkpoint, device)
        return _predict_cohort(model, meta, checkpoint, slides, Path(out_dir), device, replace(options, workers=workers))


def _predict_cohort(model: torch.nn.Module, meta: ModelMetadata, checkpoint: str | Path, slides: list[Path], out_dir: Path,
                    device: torch.device, options: SlidePredictOptions) -> pd.DataFrame:
    mpp = _model_mpp(meta, checkpoint, options.mpp)
    if options.heatmap_class is not None and options.heatmap_class not in meta.class_names:
        raise DataError(f"--heatmap-class {options.heatmap_class}: not a class of the model ({', '.join(meta.class_names)})")
    resolutions, unopenable = _survey(slides, options.slide_mpp)
    if not options.allow_upsampling:
        for path, scanned in resolutions.items():
            check_upsampling(path, scanned, mpp, f"the model's {mpp:g} um/px", f"predict on a scan at {mpp:g} um/px or "
                             "finer (or with a model trained at the slide's resolution)")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"model_sha256": file_sha256(model_file(checkpoint)), "tile_size": meta.image_size, "mpp": mpp,
              "slide_mpp": options.slide_mpp, "min_tissue": options.min_tissue}
    rows = resume_rows(out_dir, params)
    predictor = _Predictor(model, meta, mpp, eval_transform(meta), device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch but the last has the same shape
    for path in slides:
        sid = slide_id(path)
        if path in unopenable:
            log.warning("%s: skipped: %s", sid, unopenable[path])
            rows[sid] = skipped_row(sid, path, unopenable[path])
        elif finished(rows.get(sid), path, _outputs(out_dir, sid, options.heatmap_class)):
            log.info("%s: already predicted in %s, kept", sid, out_dir)
            continue
        else:
            rows[sid] = _predict_or_skip(path, predictor, out_dir, options)
        write_summary(out_dir, rows, meta.class_names)
    return write_summary(out_dir, rows, meta.class_names)


def _survey(slides: list[Path], slide_mpp: float | None) -> tuple[dict[Path, float], dict[Path, str]]:
    """Every slide opened once before any work: the um/px of each that opens, and the reason for
    each that cannot be opened (damaged, truncated, no resolution)."""
    resolutions, reasons = {}, {}
    for path in slides:
        try:
            with Slide(path, slide_mpp) as slide:
                resolutions[path] = slide.mpp
        except DataError as exc:
            reasons[path] = _one_line(str(exc))
    return resolutions, reasons


def _one_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _outputs(out_dir: Path, sid: str, heatmap_class: str | None) -> list[Path]:
    names = [f"{sid}.csv", f"{sid}.geojson", f"{sid}_heatmap.png"]
    if heatmap_class is not None:
        names.append(f"{sid}_heatmap_{heatmap_class}.png")
    return [out_dir / name for name in names]


def _predict_or_skip(path: Path, predictor: _Predictor, out_dir: Path, options: SlidePredictOptions) -> dict:
    try:
        return _predict_slide(path, predictor, out_dir, options)
    except DataError as exc:
        reason = _one_line(str(exc))
        log.warning("%s: skipped: %s", slide_id(path), reason)
        return skipped_row(slide_id(path), path, reason)


def _predict_slide(path: Path, predictor: _Predictor, out_dir: Path, options: SlidePredictOptions) -> dict:
    start = time.perf_counter()
    with Slide(path, options.slide_mpp) as slide:
        plan = plan_tiles(slide, predictor.meta.image_size, predictor.mpp, options.min_tissue)
        thumb_ds = max(1.0, max(slide.dimensions) / HEATMAP_MAX_SIDE)
        thumbnail = slide.thumbnail(thumb_ds)
    tissue_s = time.perf_counter() - start
    stream = _stream(plan, predictor, options)
    frame = _tile_frame(plan, stream, predictor.meta.class_names)
    reason = _report_unreadable(plan, stream)
    _write_slide_outputs(out_dir, plan, frame, predictor.meta.class_names, thumbnail, thumb_ds, options.heatmap_class)
    seconds = time.perf_counter() - start
    log.info("%s: %d tiles in %.1f s (%.0f tiles/s): tissue %.1f s, model %.1f s of which %.0f %% waiting for tiles, "
             "outputs %.1f s", plan.slide_id, len(frame), seconds, len(frame) / seconds, tissue_s, stream.seconds,
             100 * stream.data_wait, seconds - tissue_s - stream.seconds)
    return done_row(plan, frame, predictor.meta.class_names, len(stream.failures), reason, seconds, stream.data_wait)


def _stream(plan: TilePlan, predictor: _Predictor, options: SlidePredictOptions) -> StreamResult:
    frame = plan.frame
    names = predictor.meta.class_names
    if frame.empty:
        log.warning("%s: no tissue tiles found (min tissue fraction %.2f)", plan.slide_id, options.min_tissue)
        return StreamResult(np.zeros((0, len(names)), dtype=np.float32))
    boxes = frame[["x", "y", "size", "level"]].to_numpy(dtype=np.int64)
    per_tile, per_batch = split_for_device(predictor.transform, predictor.device)
    dataset = SlideTileBatches(plan.slide, plan.slide_mpp, boxes, predictor.meta.image_size, options.batch_size,
                               per_tile, plan.reader)
    return stream_probs(predictor.model, dataset, len(names), predictor.device, min(options.workers, len(dataset)),
                        options.progress, plan.slide_id, per_batch)


def _tile_frame(plan: TilePlan, stream: StreamResult, names: list[str]) -> pd.DataFrame:
    """The readable tiles with their prediction and every class probability."""
    ok = stream.ok
    if len(ok) and not ok.any():
        first = stream.failures[min(stream.failures)]
        raise DataError(f"none of its {len(ok)} tissue tiles could be read ({_one_line(first)})")
    frame = plan.frame.reset_index(drop=True)[ok].reset_index(drop=True).copy()
    probs = stream.probs[ok]
    frame["prediction"] = [names[i] for i in probs.argmax(axis=1)] if len(probs) else []
    for i, name in enumerate(names):
        frame[f"prob_{name}"] = np.round(probs[:, i], 6)
    return frame


def unreadable_regions(plan: TilePlan, failures: dict[int, str]) -> list[tuple[int, tuple[int, int, int, int], str]]:
    """Unreadable tiles grouped into regions of touching tiles (8-connected on the tile grid):
    per region its tile count, level-0 box (x0, y0, x1, y1) and the reader's first message."""
    if not failures:
        return []
    positions = np.array(sorted(failures))
    tiles = plan.frame.reset_index(drop=True).iloc[positions]
    side = plan.tile_size * plan.mpp / plan.slide_mpp  # level-0 pixels per tile, before rounding
    col, row = (np.round(tiles[axis].to_numpy() / side).astype(int) for axis in ("x", "y"))
    grid = np.zeros((row.max() - row.min() + 1, col.max() - col.min() + 1), dtype=bool)
    grid[row - row.min(), col - col.min()] = True
    labels, count = ndimage.label(grid, structure=np.ones((3, 3), dtype=bool))
    member_of = labels[row - row.min(), col - col.min()]
    regions = []
    for label in range(1, count + 1):
        members = tiles[member_of == label]
        x1, y1 = (members["x"] + members["size"]).max(), (members["y"] + members["size"]).max()
        box = (int(members["x"].min()), int(members["y"].min()), int(x1), int(y1))
        regions.append((len(members), box, failures[int(positions[member_of == label][0])]))
    return regions


def _report_unreadable(plan: TilePlan, stream: StreamResult) -> str:
    """One warning line per unreadable region; the summary's reason ('' when all was read)."""
    regions = unreadable_regions(plan, stream.failures)
    for count, (x0, y0, x1, y1), message in regions:
        log.warning("%s: %d unreadable tile(s) in the level-0 box (%d, %d)-(%d, %d), left out of %s.csv: %s",
                    plan.slide_id, count, x0, y0, x1, y1, plan.slide_id, _one_line(message))
    if not regions:
        return ""
    return f"{len(stream.failures)} unreadable tile(s) in {len(regions)} region(s) left out"


def _write_slide_outputs(out_dir: Path, plan: TilePlan, frame: pd.DataFrame, names: list[str], thumbnail: np.ndarray,
                         thumb_ds: float, heatmap_class: str | None) -> None:
    sid = plan.slide_id
    write_table(out_dir / f"{sid}.csv", frame)
    write_geojson(out_dir / f"{sid}.geojson", frame, names)
    plot_class_map(thumbnail, thumb_ds, frame, names, out_dir / f"{sid}_heatmap.png", title=sid)
    if heatmap_class is not None:
        plot_probability_map(thumbnail, thumb_ds, frame, heatmap_class, out_dir / f"{sid}_heatmap_{heatmap_class}.png",
                             title=sid)
