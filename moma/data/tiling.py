"""From slides to a tile data set: tissue detection, the tile grid, labels, PNG tiles, manifest.

The tissue mask comes from a low-resolution image of the whole slide (a few mask pixels per
tile): Otsu's threshold on the logarithm of the HSV saturation, since stained tissue is coloured
and glass is grey or white. On the plain saturation, Otsu tends to split strongly stained tissue
from pale tissue (normal lung, fat, loose stroma) instead of tissue from glass; the logarithm
spreads the low end where that boundary lies. A tile is kept when the tissue covers at least
``min_tissue`` of it.

Tiles are written as ``<out>/tiles/<slide id>/<slide id>_x<X>_y<Y>.png`` (X, Y: level-0 pixels)
with a ``manifest.csv`` (``path,label,group,x,y,level,size,tissue``; ``group`` is the slide id, so
every split keeps a slide on one side). Memory does not grow with the slide: tiles are read one by
one, the mask is small, and worker processes receive only coordinates.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.filters import threshold_otsu
from tqdm import tqdm

from moma.data.annotations import find_annotation_file, label_tiles, read_annotations
from moma.data.slides import Slide, SlideReader, slide_id
from moma.data.tiles import MANIFEST_NAME
from moma.errors import DataError

log = logging.getLogger(__name__)

MASK_PIXELS_PER_TILE = 8
MAX_MASK_SIDE = 4096
# Below this saturation (0-255) a pixel is never tissue, whatever Otsu says: on a slide that is
# almost all glass, Otsu would otherwise split the noise of the background in two.
MIN_TISSUE_SATURATION = 15
TILING_PARAMS = "tiling.json"
MANIFEST_COLUMNS = ["path", "label", "group", "x", "y", "level", "size", "tissue"]
# A slide may be this much coarser than the tiles asked for before reading it means upsampling
# (scanners round their nominal resolution; 0.2527 for "0.25" is still a 40x scan).
UPSAMPLING_TOLERANCE = 0.10
_CHUNK = 32  # tiles per task sent to a worker process
# PNG compression 1 instead of PIL's 6: about 3x faster to write for ~15 % larger files.
_PNG_COMPRESS_LEVEL = 1


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of stained tissue in an RGB image (Otsu on log saturation, with a floor)."""
    log_saturation = np.log1p(np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1].astype(np.float32))
    threshold = np.log1p(MIN_TISSUE_SATURATION)
    if log_saturation.min() != log_saturation.max():
        threshold = max(threshold, float(threshold_otsu(log_saturation)))
    return log_saturation > threshold


@dataclass
class TilePlan:
    """The tissue tiles of one slide: level-0 boxes, the level they are read from, and the mask."""

    slide: Path
    slide_mpp: float
    tile_size: int
    mpp: float
    frame: pd.DataFrame  # x, y, level, size, tissue (one row per tissue tile)
    mask: np.ndarray
    mask_downsample: float
    level: int  # the pyramid level the tiles are read from
    level_mpp: float
    reader: type[SlideReader]

    @property
    def slide_id(self) -> str:
        return slide_id(self.slide)

    @property
    def scale(self) -> float:
        """Tile pixels per pixel of the level read: below 1 shrunk, above 1 upsampled."""
        return self.level_mpp / self.mpp


def upsamples(slide_mpp: float, mpp: float) -> bool:
    """Whether tiles at ``mpp`` from a slide scanned at ``slide_mpp`` would be enlarged (beyond
    the tolerance), i.e. hold detail the scan never had."""
    return slide_mpp > mpp * (1 + UPSAMPLING_TOLERANCE)


def tile_side(slide: Slide, tile_size: int, mpp: float) -> float:
    """The side of a ``tile_size`` px tile at ``mpp`` in level-0 pixels."""
    side = tile_size * mpp / slide.mpp
    if side < 1:
        raise DataError(f"slide {slide.path}: {tile_size} px at {mpp} um/px is below one pixel of the slide")
    return side


def refuse_upsampling(slides: list[Path], mpp: float, slide_mpp: float | None, target: str, remedy: str) -> None:
    """A one-line DataError for the first slide scanned coarser than ``mpp``; every slide is
    checked before any work, so a refusal never comes after hours of tiling or prediction."""
    for path in slides:
        with Slide(path, slide_mpp) as slide:
            check_upsampling(path, slide.mpp, mpp, target, remedy)


def check_upsampling(path: Path, scanned_mpp: float, mpp: float, target: str, remedy: str) -> None:
    """The one-line DataError of :func:`refuse_upsampling` for one slide scanned at ``scanned_mpp``."""
    if upsamples(scanned_mpp, mpp):
        raise DataError(f"slide {path} is scanned at {scanned_mpp:g} um/px, coarser than {target}: its tiles "
                        f"would be upsampled; {remedy}, or pass --allow-upsampling")


def plan_tiles(slide: Slide, tile_size: int, mpp: float, min_tissue: float = 0.5) -> TilePlan:
    """The non-overlapping grid of whole tiles from the top-left corner, tissue tiles only."""
    side = tile_side(slide, tile_size, mpp)
    width, height = slide.dimensions
    mask_ds = max(1.0, side / MASK_PIXELS_PER_TILE, max(width, height) / MAX_MASK_SIDE)
    mask = tissue_mask(slide.thumbnail(mask_ds))
    cols, rows = int(width // side), int(height // side)
    grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows))
    x = np.round(grid_x.ravel() * side).astype(np.int64)
    y = np.round(grid_y.ravel() * side).astype(np.int64)
    size = int(round(side))
    fraction = _box_means(mask, x / mask_ds, y / mask_ds, size / mask_ds)
    keep = fraction >= min_tissue if min_tissue > 0 else np.ones(len(x), dtype=bool)
    level = slide.level_for(side / tile_size)
    frame = pd.DataFrame({"x": x[keep], "y": y[keep], "level": level, "size": size, "tissue": np.round(fraction[keep], 4)})
    return TilePlan(slide.path, slide.mpp, tile_size, mpp, frame, mask, mask_ds, level,
                    slide.mpp * slide.downsamples[level], type(slide.reader))


def _box_means(mask: np.ndarray, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Mean of ``mask`` over each box (mask-pixel coordinates), via a summed-area table."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(x).astype(int), 0, mask.shape[1])
    y0 = np.clip(np.round(y).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.round(x + side).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.round(y + side).astype(int), 0, mask.shape[0])
    area = np.maximum(1, (x1 - x0) * (y1 - y0))
    return (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area


@dataclass
class TilingOptions:
    tile_size: int = 224
    mpp: float = 0.5
    min_tissue: float = 0.5
    annotations: Path | None = None
    label_by: str = "centre"
    min_overlap: float = 0.5
    unlabelled: str | None = None  # label for tiles outside every annotation; None skips them
    label: str = "unlabelled"  # label of every tile when there are no annotations
    slide_mpp: float | None = None
    allow_upsampling: bool = False
    workers: int = 0
    progress: bool = True


@dataclass
class TilingSummary:
    slides: int = 0
    tiles: int = 0
    written: int = 0
    skipped_existing: int = 0
    manifest: Path | None = None


def tile_name(slide: str, x: int, y: int) -> str:
    return f"tiles/{slide}/{slide}_x{x}_y{y}.png"


def _labels(plan: TilePlan, options: TilingOptions) -> np.ndarray:
    frame = plan.frame
    if options.annotations is None:
        return np.full(len(frame), options.label, dtype=object)
    found = find_annotation_file(options.annotations, plan.slide_id)
    if found is None:
        log.warning("no annotations for slide %s (looked for %s/%s.geojson)", plan.slide_id, options.annotations, plan.slide_id)
        regions = {}
    else:
        regions = read_annotations(found)
    labels = label_tiles(regions, frame["x"], frame["y"], frame["size"], options.label_by, options.min_overlap)
    if options.unlabelled is not None:
        labels[labels == None] = options.unlabelled  # noqa: E711 (element-wise on an object array)
    return labels


def _write_tile(slide: Slide, out: Path, x: int, y: int, size: int, level: int, tile_size: int) -> None:
    pixels = slide.read_rgb(x, y, size, level, tile_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    os.replace(tmp, out)  # an interrupted run leaves no half-written tile behind


# One open slide per worker process, kept between tasks of the same slide. Never inherited: an
# open file handle shared across fork shares its file offset and locks with the parent.
_worker_slide: Slide | None = None


def _worker_init() -> None:
    global _worker_slide
    _worker_slide = None


def _worker_task(task: tuple) -> int:
    global _worker_slide
    path, slide_mpp, reader, tile_size, jobs = task
    if _worker_slide is None or _worker_slide.path != path:
        if _worker_slide is not None:
            _worker_slide.close()
        _worker_slide = Slide(path, slide_mpp, reader)
    _write_tiles(_worker_slide, tile_size, jobs)
    return len(jobs)


def _write_tiles(slide: Slide, tile_size: int, jobs: list[tuple]) -> None:
    for out, x, y, size, level in jobs:
        _write_tile(slide, out, x, y, size, level, tile_size)


def _check_params(out: Path, options: TilingOptions) -> None:
    """Tiles of another size or resolution must not mix with these (re-runs skip existing files)."""
    params_file = out / TILING_PARAMS
    params = {"tile_size": options.tile_size, "mpp": options.mpp}
    if params_file.is_file():
        saved = json.loads(params_file.read_text())
        if {k: saved.get(k) for k in params} != params:
            raise DataError(f"--out {out} holds tiles of {saved.get('tile_size')} px at {saved.get('mpp')} um/px, not "
                            f"{options.tile_size} px at {options.mpp} um/px; use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(params_file, json.dumps(params, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _update_manifest(out: Path, slide: str, rows: pd.DataFrame) -> None:
    """Replace this slide's rows in the manifest; rows of other slides (earlier runs) stay."""
    manifest = out / MANIFEST_NAME
    frames = [rows]
    if manifest.is_file():
        old = pd.read_csv(manifest, dtype={"group": str, "label": str}, keep_default_na=False)
        frames.insert(0, old[old["group"] != slide])
    merged = pd.concat(frames, ignore_index=True)[MANIFEST_COLUMNS]
    _atomic_write(manifest, merged.to_csv(index=False))


def tile_slides(slides: list[Path], out: Path, options: TilingOptions) -> TilingSummary:
    """Tile every slide into ``out``; tiles already on disk are not read or written again."""
    out = Path(out)
    if not options.allow_upsampling:
        refuse_upsampling(slides, options.mpp, options.slide_mpp, f"the {options.mpp:g} um/px asked for (--tile-mpp)",
                          "tile at the slide's resolution or coarser")
    _check_params(out, options)
    summary = TilingSummary(manifest=out / MANIFEST_NAME)
    pool = multiprocessing.get_context().Pool(options.workers, initializer=_worker_init) if options.workers > 0 else None
    try:
        for path in slides:
            written, existing, total = _tile_one(path, out, options, pool)
            summary.slides += 1
            summary.tiles += total
            summary.written += written
            summary.skipped_existing += existing
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return summary


def _tile_one(path: Path, out: Path, options: TilingOptions, pool) -> tuple[int, int, int]:
    with Slide(path, options.slide_mpp) as slide:
        plan = plan_tiles(slide, options.tile_size, options.mpp, options.min_tissue)
    frame = plan.frame.copy()
    frame["label"] = _labels(plan, options)
    frame = frame[frame["label"].notna()].reset_index(drop=True)
    frame["group"] = plan.slide_id
    frame["path"] = [tile_name(plan.slide_id, x, y) for x, y in zip(frame["x"], frame["y"])]
    exists = np.array([(out / p).is_file() for p in frame["path"]], dtype=bool)
    jobs = [(out / p, int(x), int(y), int(s), int(lv))
            for p, x, y, s, lv in frame.loc[~exists, ["path", "x", "y", "size", "level"]].itertuples(index=False)]
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    if pool is None:
        with Slide(path, plan.slide_mpp, plan.reader) as slide:
            _follow(_in_process(slide, options.tile_size, chunks), plan, frame, exists, options)
    else:
        tasks = ((plan.slide, plan.slide_mpp, plan.reader, options.tile_size, chunk) for chunk in chunks)
        _follow(pool.imap_unordered(_worker_task, tasks), plan, frame, exists, options)
    _update_manifest(out, plan.slide_id, frame)
    log.info("%s: %d tissue tile(s), %d written, %d already there", plan.slide_id, len(frame), len(jobs), int(exists.sum()))
    return len(jobs), int(exists.sum()), len(frame)


def _in_process(slide: Slide, tile_size: int, chunks: list[list[tuple]]):
    for chunk in chunks:
        _write_tiles(slide, tile_size, chunk)
        yield len(chunk)


def _follow(results, plan: TilePlan, frame: pd.DataFrame, exists: np.ndarray, options: TilingOptions) -> None:
    with tqdm(total=len(frame), initial=int(exists.sum()), desc=plan.slide_id, unit="tile",
              disable=not options.progress, leave=False) as bar:  # closed on errors too: clean error line
        for done in results:
            bar.update(done)
