"""Scanner formats through OpenSlide (SVS, NDPI, MRXS, SCN, ...), with their vendor metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moma.data.slide_readers.base import TIFF_SUFFIXES, SlideReader, region_error
from moma.errors import DataError

# Formats OpenSlide reads whose extension alone says "slide". TIFF files may be slides or plain
# tile images: OpenSlide decides.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".czi", ".dcm")


def _openslide():
    # Imported on use: the package and its bundled library are only needed for slides.
    import openslide

    return openslide


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's vendor name for a file it can open ('aperio', 'generic-tiff', ...), else None."""
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except Exception:  # unreadable or odd files are simply "not a slide"
        return None


class OpenSlideReader(SlideReader):
    name = "openslide"
    formats = f"scanner formats ({', '.join(SLIDE_SUFFIXES)}) and pyramidal tiled TIFF"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        suffix = path.suffix.lower()
        return suffix in SLIDE_SUFFIXES or (suffix in TIFF_SUFFIXES and openslide_vendor(path) is not None)

    def __init__(self, path: str | Path):
        super().__init__(path)
        openslide = _openslide()
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise DataError(f"{self.path} is not a slide OpenSlide can read (whole-slide formats: {self.formats})") from None
        except openslide.OpenSlideError as exc:
            raise DataError(f"slide {self.path} cannot be read ({exc}); the file may be damaged or incomplete") from None

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        try:
            return float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None

    @property
    def vendor(self) -> str:
        return self._osr.properties.get("openslide.vendor", "unknown")

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._osr.read_region((int(x), int(y)), level, (int(width), int(height)))
        except _openslide().OpenSlideError as exc:
            raise region_error(self.path, x, y, exc) from None
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))  # transparent = not scanned
        return np.asarray(Image.alpha_composite(white, region).convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._osr.close()
