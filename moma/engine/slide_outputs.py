"""What slide prediction writes per slide: the tile table (CSV), a GeoJSON that QuPath imports,
and heatmaps over the slide thumbnail. Every file is written atomically, so a killed run leaves
whole files or none (which is what resuming relies on).

The GeoJSON is QuPath's own layout (what *File > Export objects as GeoJSON* writes and *Import
objects from file* reads, QuPath 0.4 and later): a FeatureCollection of Features, one square
Polygon per tile in level-0 pixels, ``properties.objectType`` "detection", the predicted class as
``properties.classification`` ``{name, color: [r, g, b]}``, and the probabilities as
``properties.measurements`` ``{name: value}``. It is streamed feature by feature, so a slide of
100,000 tiles does not build the whole document in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from moma.engine.plots import plt, save_figure
from moma.utils.io import atomic_path

# Class colours (RGB), the same in the heatmaps and in QuPath: matplotlib's tab10, then tab20.
_PALETTE = [tuple(int(round(255 * c)) for c in colour) for colour in
            list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])]
OBJECT_TYPE = "detection"


def class_colours(class_names: list[str]) -> dict[str, tuple[int, int, int]]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(class_names)}


def write_table(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def tile_feature(x: int, y: int, size: int, predicted: str, probs: np.ndarray, names: list[str],
                 colour: tuple[int, int, int]) -> dict:
    """One tile as a QuPath detection: its square, its predicted class and colour, and every class
    probability (plus the winning one as ``probability``) as measurements."""
    measurements = {f"prob_{name}": float(value) for name, value in zip(names, probs)}
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]},
        "properties": {
            "objectType": OBJECT_TYPE,
            "classification": {"name": predicted, "color": list(colour)},
            "measurements": {"probability": float(np.max(probs)), **measurements},
        },
    }


def write_geojson(path: Path, frame: pd.DataFrame, names: list[str]) -> None:
    """The tiles of ``frame`` (x, y, size, prediction, prob_<class>) as a FeatureCollection."""
    colours = class_colours(names)
    boxes = frame[["x", "y", "size"]].to_numpy(dtype=np.int64).tolist()
    probs = frame[[f"prob_{name}" for name in names]].to_numpy(dtype=float)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write('{"type": "FeatureCollection", "features": [')
            for i, ((x, y, size), predicted) in enumerate(zip(boxes, frame["prediction"])):
                feature = tile_feature(x, y, size, predicted, probs[i], names, colours[predicted])
                handle.write(("," if i else "") + "\n" + json.dumps(feature))
            handle.write("\n]}\n")


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
    ax.imshow(thumbnail, interpolation="none")  # drawn near its own size: resampling would only cost time
    ax.set_axis_off()
    ax.set_title(title)
    return fig, ax


def plot_class_map(thumbnail: np.ndarray, ds: float, frame: pd.DataFrame, names: list[str], path: Path, title: str,
                   dpi: int = 130) -> None:
    """The predicted class of every tissue tile, in the class colours, over the slide thumbnail."""
    colours = class_colours(names)
    rgba = np.array([[*colours[p], 255] for p in frame["prediction"]], dtype=np.float32).reshape(-1, 4) / 255
    overlay = _paint(thumbnail.shape[:2], frame, ds, rgba)
    overlay[..., 3] = np.where(np.isnan(overlay[..., 3]), 0.0, 0.45)
    fig, ax = _figure(thumbnail, title)
    ax.imshow(np.nan_to_num(overlay), interpolation="none")
    counts = frame["prediction"].value_counts()
    handles = [Patch(color=np.array(colours[n]) / 255, label=f"{n} ({int(counts.get(n, 0))} tiles)") for n in names]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="predicted class")
    save_figure(fig, path, dpi)


def plot_probability_map(thumbnail: np.ndarray, ds: float, frame: pd.DataFrame, class_name: str, path: Path,
                         title: str, dpi: int = 130) -> None:
    """The probability of one class for every tissue tile over the slide thumbnail."""
    values = _paint(thumbnail.shape[:2], frame, ds, frame[[f"prob_{class_name}"]].to_numpy(dtype=np.float32))[..., 0]
    fig, ax = _figure(thumbnail, title)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="none")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, label=f"P({class_name})")
    save_figure(fig, path, dpi)
