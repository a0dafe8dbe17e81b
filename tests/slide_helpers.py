"""Test slides made at test time: a pyramidal TIFF whose cells hold real shipped H&E tiles of two
classes, on a grid drawn as text, with the annotations of the same layout as QuPath GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "lc25000_lung"
CLASSES = {"A": "lung_n", "B": "lung_scc"}
CELL = 64  # level-0 pixels per layout cell = one shipped 64 px tile
SLIDE_MPP = 0.25
# '.' is glass; each letter a region of one class. Regions are not rectangles, on purpose.
LAYOUT = (
    "..............",
    ".AAAAA...BBBB.",
    ".AAAAA..BBBBB.",
    ".AAAA...BBBBB.",
    ".AAAA..BBBBBB.",
    ".AAA...BBBBB..",
    "..AA....BBB...",
    "..............",
)


def cells(layout=LAYOUT, letter: str | None = None) -> list[tuple[int, int]]:
    """(row, col) of the cells holding ``letter`` (any class when None)."""
    return [(r, c) for r, line in enumerate(layout) for c, ch in enumerate(line)
            if (ch == letter if letter else ch != ".")]


def _background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    glass = np.array([236, 234, 238], dtype=float)
    return np.clip(glass + rng.normal(0, 4, (*shape, 3)), 0, 255).astype(np.uint8)


def slide_pixels(layout=LAYOUT, first_tile: int = 0, seed: int = 0) -> np.ndarray:
    """The level-0 RGB image: cell (r, c) of class X holds shipped tile number first_tile + k of X."""
    rng = np.random.default_rng(seed)
    image = _background((len(layout) * CELL, len(layout[0]) * CELL), rng)
    for letter, name in CLASSES.items():
        files = sorted((DEMO / name).glob("*.png"))
        for k, (r, c) in enumerate(cells(layout, letter)):
            tile = np.asarray(Image.open(files[first_tile + k]).convert("RGB"))
            image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = tile
    return image


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [image]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        out.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    return out


def write_slide(path: Path, image: np.ndarray, mpp: float | None = SLIDE_MPP, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF that OpenSlide opens as 'generic-tiff' (with its mpp when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for level, pixels in enumerate(pyramid(image, levels)):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(pixels, tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=0 if level == 0 else 1, **extra)
    return path


def make_slide(path: Path, layout=LAYOUT, first_tile: int = 0, seed: int = 0, mpp: float | None = SLIDE_MPP) -> Path:
    return write_slide(path, slide_pixels(layout, first_tile, seed), mpp)


def layout_annotations(path: Path, layout=LAYOUT) -> Path:
    """QuPath-style GeoJSON: per class, one polygon per row run of cells (QuPath would merge them;
    the reader unions them too), plus one unclassified polygon that must be ignored."""
    features = []
    for letter, name in CLASSES.items():
        for r, line in enumerate(layout):
            c = 0
            while c < len(line):
                if line[c] != letter:
                    c += 1
                    continue
                start = c
                while c < len(line) and line[c] == letter:
                    c += 1
                x0, x1, y0, y1 = start * CELL, c * CELL, r * CELL, (r + 1) * CELL
                features.append({"type": "Feature", "id": f"{name}-{r}-{start}",
                                 "geometry": {"type": "Polygon",
                                              "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                                 "properties": {"objectType": "annotation",
                                                "classification": {"name": name, "color": [255, 0, 0]}}})
    features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [CELL, 0], [CELL, CELL], [0, 0]]]},
                     "properties": {"objectType": "annotation"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def damaged_copy(slide: Path, path: Path, level: int, tiles: list[int] | None = None) -> Path:
    """A copy of ``slide`` whose TIFF tiles ``tiles`` of ``level`` (default: the middle one) hold garbage."""
    data = bytearray(slide.read_bytes())
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[level]
        for index in tiles if tiles is not None else [len(page.dataoffsets) // 2]:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data[offset:offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    return path
