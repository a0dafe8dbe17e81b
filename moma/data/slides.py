"""Whole-slide images: finding slide files, and ``Slide``, a slide opened through its reader (see
``moma.data.slide_readers``) with a known level-0 resolution (microns per pixel).

Coordinates are level-0 pixels throughout, as in OpenSlide and QuPath. A tile is asked for by its
level-0 box and its output size; it is read from the finest pyramid level that is not finer than
needed (so it is only shrunk, unless the slide is coarser than the tile) and resized the rest of
the way.

A new format needs one ``SlideReader`` subclass registered with ``register_reader``; nothing here
changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moma.data.slide_readers import SlideReader, describe_readers, open_reader, reader_for, register_reader
from moma.data.slide_readers.base import TIFF_SUFFIXES
from moma.errors import DataError

__all__ = ["Slide", "SlideReader", "collect_slides", "folder_has_slides", "is_slide_file", "register_reader",
           "slide_id", "slides_in_folder"]

# A folder of tiles may hold thousands of TIFFs; whether it holds slides is decided from a few.
_MAX_TIFF_PROBES = 20


def is_slide_file(path: Path) -> bool:
    """A file some registered reader can open."""
    return path.is_file() and not path.name.startswith(".") and reader_for(path) is not None


def slides_in_folder(folder: Path) -> list[Path]:
    """Slide files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if is_slide_file(p))


def folder_has_slides(folder: Path) -> bool:
    """Whether ``folder`` holds slides at its top level (only a few TIFFs are probed)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    tiffs = [p for p in files if p.suffix.lower() in TIFF_SUFFIXES][:_MAX_TIFF_PROBES]
    others = [p for p in files if p.suffix.lower() not in TIFF_SUFFIXES]
    return any(reader_for(p) is not None for p in others + tiffs)


def collect_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files from slide paths and folders; every input must yield at least one slide."""
    slides: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"slide {item} not found")
        if item.is_dir():
            found = slides_in_folder(item)
            if not found:
                raise DataError(f"folder {item} holds no slides a reader can open ({describe_readers()})")
            slides += found
        elif is_slide_file(item):
            slides.append(item)
        else:
            raise DataError(f"{item} is not a slide any reader can open ({describe_readers()})")
    ids: dict[str, Path] = {}
    for slide in slides:
        other = ids.setdefault(slide_id(slide), slide)
        if other != slide:
            raise DataError(f"slides {other} and {slide} share the id {slide_id(slide)!r}; rename one (the id is the file name)")
    return slides


def slide_id(path: Path) -> str:
    return Path(path).stem


class Slide:
    """An open slide with a known level-0 resolution (microns per pixel): its metadata's, or
    ``slide_mpp`` when given. ``reader`` is a registered reader's name or class; by default the
    first reader that can open the file."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None, reader: str | type[SlideReader] | None = None):
        self.path = Path(path)
        self.id = slide_id(self.path)
        if not self.path.is_file():
            raise DataError(f"slide {self.path} not found")
        self.reader = open_reader(self.path, reader)
        try:
            self.mpp = float(slide_mpp) if slide_mpp else self._metadata_mpp()
        except DataError:
            self.reader.close()
            raise
        self.dimensions: tuple[int, int] = self.reader.dimensions
        self.downsamples: tuple[float, ...] = self.reader.downsamples

    def _metadata_mpp(self) -> float:
        mpp = self.reader.mpp
        if mpp is None:
            raise DataError(f"slide {self.path} has no microns-per-pixel in its metadata; pass --slide-mpp "
                            "(its level-0 resolution, e.g. 0.25 for a 40x scan)")
        mpp_x, mpp_y = mpp
        if mpp_x <= 0 or abs(mpp_x - mpp_y) / mpp_x > 0.01:
            raise DataError(f"slide {self.path}: unusable pixel size {mpp_x} x {mpp_y} um; pass --slide-mpp")
        return mpp_x

    @property
    def vendor(self) -> str:
        return self.reader.vendor

    def level_for(self, downsample: float) -> int:
        return self.reader.best_level(downsample)

    def read_rgb(self, x: int, y: int, size: int, level: int, out_size: int) -> np.ndarray:
        """The level-0 box (x, y, size x size) read at ``level`` as an ``out_size`` square RGB array;
        parts outside the scanned area are white."""
        level_size = max(1, int(round(size / self.downsamples[level])))
        pixels = self.reader.read_region(int(x), int(y), level, level_size, level_size)
        if level_size == out_size:
            return pixels
        return np.asarray(Image.fromarray(pixels).resize((out_size, out_size), Image.Resampling.BILINEAR), dtype=np.uint8)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide shrunk by ``downsample`` (>= 1) as an RGB array."""
        return self.reader.thumbnail(downsample)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
