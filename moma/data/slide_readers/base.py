"""What every slide reader provides: level sizes, resolution, vendor, and regions as RGB arrays.

Coordinates are level-0 pixels throughout, as in OpenSlide and QuPath: a region is asked for by
its level-0 top-left corner, the pyramid level to read, and its size in that level's pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from moma.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
# Reading a level in one piece is fine up to this many pixels; beyond it, thumbnails are read in
# strips so memory does not grow with the slide.
MAX_READ_PIXELS = 4_000_000


class SlideReader(ABC):
    """One open slide file. Subclasses set ``name`` (the registry key) and ``formats`` (what they
    read, for messages) and are registered with ``moma.data.slides.register_reader``."""

    name: ClassVar[str]
    formats: ClassVar[str]

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    @abstractmethod
    def can_open(cls, path: Path) -> bool:
        """Whether this reader reads ``path``; decided from the suffix where that suffices, since
        folders of tiles are probed file by file."""

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, finest first."""

    @property
    @abstractmethod
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 microns per pixel (x, y) from the file's metadata; None when it does not say."""

    @property
    @abstractmethod
    def vendor(self) -> str:
        """The format or scanner vendor ('aperio', 'tiff', 'ome-tiff', ...)."""

    @abstractmethod
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of ``level`` from level-0 (x, y); white outside the scanned
        area. An unreadable region raises DataError (see ``region_error``)."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def downsamples(self) -> tuple[float, ...]:
        # OpenSlide's definition (mean of the two axes' ratios), so both readers agree on a file.
        width, height = self.dimensions
        return tuple((width / w + height / h) / 2 for w, h in self.level_dimensions)

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample`` (a small tolerance
        absorbs the rounding of level sizes, e.g. 2.0003 for a nominal 2)."""
        fine_enough = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.001]
        return max(fine_enough) if fine_enough else 0

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide shrunk by ``downsample`` (>= 1) as an RGB array, read in strips."""
        downsample = max(1.0, downsample)
        width, height = self.dimensions
        out_w, out_h = max(1, int(width / downsample)), max(1, int(height / downsample))
        level = self.best_level(downsample)
        level_ds = self.downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        rows_per_strip = max(1, int(MAX_READ_PIXELS / level_w * (level_ds / downsample)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        scale = downsample / level_ds  # level pixels per output pixel
        for top in range(0, out_h, rows_per_strip):
            bottom = min(out_h, top + rows_per_strip)
            first, last = int(top * scale), min(int(np.ceil(bottom * scale)), level_h)
            region = self.read_region(0, int(first * level_ds), level, level_w, max(1, last - first))
            strip = Image.fromarray(region).resize((out_w, bottom - top), Image.Resampling.BILINEAR)
            out[top:bottom] = np.asarray(strip, dtype=np.uint8)
        return out

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def region_error(path: Path, x: int, y: int, exc: Exception) -> DataError:
    return DataError(f"slide {path}: cannot read the region at ({x}, {y}) ({exc}); the file may be damaged or incomplete")
