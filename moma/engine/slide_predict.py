"""Predicting whole slides: tissue tiles streamed through the model in batches, written per slide as
a CSV, a heatmap on the slide thumbnail and a GeoJSON of tile polygons that QuPath imports as
detections; one summary CSV (class fractions of the tissue area) over all slides.

Tiles are read at the checkpoint's tile size (``image_size``) and resolution (``mpp``), on the same
grid and with the same tissue detection as ``moma tile``. A slide scanned coarser than the model's
resolution is refused unless upsampling is allowed: the model would see detail the scan never had.
The summary records the pyramid level each slide was read from and the scale applied to it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from moma.data.slide_dataset import SlideTileDataset  # noqa: E402
from moma.data.slides import Slide  # noqa: E402
from moma.data.tiling import TilePlan, plan_tiles, refuse_upsampling  # noqa: E402
from moma.engine.checkpoint import ModelMetadata  # noqa: E402
from moma.engine.evaluate import predict_probs  # noqa: E402
from moma.engine.inference import eval_transform, load_classifier  # noqa: E402
from moma.utils.io import atomic_path, atomic_write_text  # noqa: E402
from moma.errors import CheckpointError, DataError  # noqa: E402

log = logging.getLogger(__name__)

# Class colours (RGB), the same in the heatmaps and in QuPath: matplotlib's tab10, then tab20.
_PALETTE = [tuple(int(round(255 * c)) for c in colour) for colour in
            list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])]
HEATMAP_MAX_SIDE = 1024
SUMMARY_NAME = "summary.csv"


def class_colours(class_names: list[str]) -> dict[str, tuple[int, int, int]]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(class_names)}


@dataclass
class SlidePredictOptions:
    batch_size: int = 128
    workers: int = 0
    slide_mpp: float | None = None
    mpp: float | None = None  # overrides the checkpoint's
    allow_upsampling: bool = False
    min_tissue: float = 0.5
    heatmap_class: str | None = None
    progress: bool = True


def _model_mpp(meta: ModelMetadata, checkpoint: str | Path, override: float | None) -> float:
    if override:
        return override
    if not meta.mpp:
        raise CheckpointError(f"checkpoint {checkpoint} does not record the microns per pixel of its tiles "
                              "(trained without data.mpp); pass --mpp")
    return float(meta.mpp)


def predict_slides(checkpoint: str | Path, slides: list[Path], out_dir: Path, device: torch.device,
                   options: SlidePredictOptions) -> pd.DataFrame:
    """Predict every slide into ``out_dir``; returns (and writes) the summary table."""
    model, meta = load_classifier(checkpoint, device)
    mpp = _model_mpp(meta, checkpoint, options.mpp)
    if options.heatmap_class is not None and options.heatmap_class not in meta.class_names:
        raise DataError(f"--heatmap-class {options.heatmap_class}: not a class of the model ({', '.join(meta.class_names)})")
    if not options.allow_upsampling:
        refuse_upsampling(slides, mpp, options.slide_mpp, f"the model's {mpp:g} um/px",
                          f"predict on a scan at {mpp:g} um/px or finer (or with a model trained at the slide's resolution)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in slides:
        with Slide(path, options.slide_mpp) as slide:
            plan = plan_tiles(slide, meta.image_size, mpp, options.min_tissue)
            thumb_ds = _display_downsample(slide)
            thumbnail = slide.thumbnail(thumb_ds)
        frame = _predict_plan(model, meta, plan, device, options)
        _write_slide_outputs(out_dir, plan, frame, meta.class_names, thumbnail, thumb_ds, options.heatmap_class)
        rows.append(_summary_row(plan, frame, meta.class_names))
    summary = pd.DataFrame(rows)
    atomic_write_text(out_dir / SUMMARY_NAME, summary.to_csv(index=False))
    return summary


def _display_downsample(slide: Slide) -> float:
    return max(1.0, max(slide.dimensions) / HEATMAP_MAX_SIDE)


def _predict_plan(model, meta: ModelMetadata, plan: TilePlan, device: torch.device,
                  options: SlidePredictOptions) -> pd.DataFrame:
    frame = plan.frame.reset_index(drop=True).copy()
    names = meta.class_names
    if frame.empty:
        log.warning("%s: no tissue tiles found (min tissue fraction %.2f)", plan.slide_id, options.min_tissue)
        probs = np.zeros((0, len(names)), dtype=np.float32)
    else:
        dataset = SlideTileDataset(plan.slide, plan.slide_mpp, frame["x"], frame["y"], frame["size"], frame["level"],
                                   meta.image_size, eval_transform(meta), plan.reader)
        loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers)
        probs, ok = predict_probs(model, loader, device, progress=options.progress, desc=plan.slide_id)
        dataset.close()
        if not ok.all():
            bad = frame.iloc[int(np.flatnonzero(~ok.astype(bool))[0])]
            raise DataError(f"slide {plan.slide}: cannot read the region at ({bad['x']}, {bad['y']}); "
                            "the file may be damaged or incomplete")
    frame["prediction"] = [names[i] for i in probs.argmax(axis=1)] if len(probs) else []
    for i, name in enumerate(names):
        frame[f"prob_{name}"] = np.round(probs[:, i], 6)
    return frame


def _write_slide_outputs(out_dir: Path, plan: TilePlan, frame: pd.DataFrame, names: list[str], thumbnail: np.ndarray,
                         thumb_ds: float, heatmap_class: str | None) -> None:
    sid = plan.slide_id
    atomic_write_text(out_dir / f"{sid}.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / f"{sid}.geojson", json.dumps(tile_features(frame, names)))
    plot_class_map(thumbnail, thumb_ds, frame, names, out_dir / f"{sid}_heatmap.png", title=sid)
    if heatmap_class is not None:
        plot_probability_map(thumbnail, thumb_ds, frame, heatmap_class, out_dir / f"{sid}_heatmap_{heatmap_class}.png",
                             title=sid)


def tile_features(frame: pd.DataFrame, names: list[str]) -> dict:
    """A GeoJSON FeatureCollection: one square per tile in level-0 pixels, as QuPath detections
    classified by the predicted class, with every class probability as a measurement."""
    colours = class_colours(names)
    probs = frame[[f"prob_{name}" for name in names]].to_numpy(dtype=float)
    features = []
    for (x, y, s), predicted, p in zip(frame[["x", "y", "size"]].to_numpy(dtype=int).tolist(), frame["prediction"], probs):
        measurements = {f"prob_{name}": float(value) for name, value in zip(names, p)}
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": predicted, "color": list(colours[predicted])},
                "measurements": {"probability": float(p.max()), **measurements},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _paint(shape: tuple[int, int], frame: pd.DataFrame, ds: float, values: np.ndarray) -> np.ndarray:
    """An (h, w, k) float image with each tile's box filled with its row of ``values``; NaN elsewhere."""
    canvas = np.full((*shape, values.shape[1]), np.nan, dtype=np.float32)
    for (x, y, s), value in zip(frame[["x", "y", "size"]].to_numpy(), values):
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        x1, y1 = max(x0 + 1, int(round((x + s) / ds))), max(y0 + 1, int(round((y + s) / ds)))
        canvas[y0:y1, x0:x1] = value
    return canvas


def _figure(thumbnail: np.ndarray, title: str):
    height, width = thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 8 * height / width + 0.8)))
    ax.imshow(thumbnail)
    ax.set_axis_off()
    ax.set_title(title)
    return fig, ax


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_class_map(thumbnail: np.ndarray, ds: float, frame: pd.DataFrame, names: list[str], path: Path, title: str) -> None:
    """The predicted class of every tissue tile, in the class colours, over the slide thumbnail."""
    colours = class_colours(names)
    rgba = np.array([[*colours[p], 255] for p in frame["prediction"]], dtype=np.float32).reshape(-1, 4) / 255
    overlay = _paint(thumbnail.shape[:2], frame, ds, rgba)
    overlay[..., 3] = np.where(np.isnan(overlay[..., 3]), 0.0, 0.45)
    fig, ax = _figure(thumbnail, title)
    ax.imshow(np.nan_to_num(overlay))
    counts = frame["prediction"].value_counts()
    handles = [Patch(color=np.array(colours[n]) / 255, label=f"{n} ({int(counts.get(n, 0))} tiles)") for n in names]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="predicted class")
    _save(fig, path)


def plot_probability_map(thumbnail: np.ndarray, ds: float, frame: pd.DataFrame, class_name: str, path: Path,
                         title: str) -> None:
    """The probability of one class for every tissue tile over the slide thumbnail."""
    values = _paint(thumbnail.shape[:2], frame, ds, frame[[f"prob_{class_name}"]].to_numpy(dtype=np.float32))[..., 0]
    fig, ax = _figure(thumbnail, title)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, label=f"P({class_name})")
    _save(fig, path)


def _summary_row(plan: TilePlan, frame: pd.DataFrame, names: list[str]) -> dict:
    """Tissue area (mm^2), the fraction of it predicted as each class, and how the slide was read:
    its level-0 um/px, the pyramid level and that level's um/px, and the scale from the level's
    pixels to the model's (below 1 shrunk, above 1 upsampled)."""
    tile_mm2 = (frame["size"].to_numpy(dtype=float) * plan.slide_mpp / 1000) ** 2
    area = tile_mm2 * frame["tissue"].to_numpy(dtype=float)
    total = float(area.sum())
    row = {"slide": plan.slide_id, "path": str(plan.slide), "tiles": len(frame), "tissue_mm2": round(total, 4),
           "slide_mpp": round(plan.slide_mpp, 4), "level": plan.level, "level_mpp": round(plan.level_mpp, 4),
           "model_mpp": plan.mpp, "scale": round(plan.scale, 4)}
    for name in names:
        share = float(area[(frame["prediction"] == name).to_numpy()].sum()) / total if total > 0 else 0.0
        row[f"fraction_{name}"] = round(share, 4)
    return row
