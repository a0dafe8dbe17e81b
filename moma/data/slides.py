"""Whole-slide images through OpenSlide (SVS, NDPI, MRXS, SCN, pyramidal TIFF, ...).

Coordinates are level-0 pixels throughout, as in OpenSlide and QuPath. A tile is asked for by its
level-0 box and its output size; it is read from the finest pyramid level that is not finer than
needed (so it is only ever shrunk, never enlarged) and resized the rest of the way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moma.errors import DataError

# Formats OpenSlide reads whose extension alone says "slide". TIFF files may be slides or plain
# tile images: OpenSlide decides (a pyramidal, tiled TIFF is a slide).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".czi", ".dcm")
TIFF_SUFFIXES = (".tif", ".tiff")
# Reading a level in one piece is fine up to this many pixels; beyond it, thumbnails are read in
# strips so memory does not grow with the slide.
_MAX_READ_PIXELS = 4_000_000
_MAX_TIFF_PROBES = 20


def _openslide():
    # Imported on use: the package and its bundled library are only needed for slides.
    import openslide

    return openslide


def detect_format(path: Path) -> str | None:
    """OpenSlide's vendor name for a file it can open ('aperio', 'generic-tiff', ...), else None."""
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except Exception:  # unreadable or odd files are simply "not a slide"
        return None


def is_slide_file(path: Path) -> bool:
    """A slide by its extension, or a TIFF that OpenSlide recognises as one."""
    if not path.is_file() or path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return suffix in SLIDE_SUFFIXES or (suffix in TIFF_SUFFIXES and detect_format(path) is not None)


def slides_in_folder(folder: Path) -> list[Path]:
    """Slide files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if is_slide_file(p))


def folder_has_slides(folder: Path) -> bool:
    """Whether ``folder`` holds slides at its top level (a few TIFFs are probed, not all of them)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(p.suffix.lower() in SLIDE_SUFFIXES for p in files):
        return True
    tiffs = [p for p in files if p.suffix.lower() in TIFF_SUFFIXES][:_MAX_TIFF_PROBES]
    return any(detect_format(p) is not None for p in tiffs)


def collect_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files from slide paths and folders; every input must yield at least one slide."""
    slides: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"slide {item} not found")
        if item.is_dir():
            found = slides_in_folder(item)
            if not found:
                raise DataError(f"folder {item} holds no slides OpenSlide can read ({', '.join(SLIDE_SUFFIXES)}, pyramidal TIFF)")
            slides += found
        elif is_slide_file(item):
            slides.append(item)
        else:
            raise DataError(f"{item} is not a slide OpenSlide can read (whole-slide formats: {', '.join(SLIDE_SUFFIXES)}, "
                            "pyramidal tiled TIFF)")
    ids: dict[str, Path] = {}
    for slide in slides:
        other = ids.setdefault(slide_id(slide), slide)
        if other != slide:
            raise DataError(f"slides {other} and {slide} share the id {slide_id(slide)!r}; rename one (the id is the file name)")
    return slides


def slide_id(path: Path) -> str:
    return Path(path).stem


class Slide:
    """An open slide with a known level-0 resolution (microns per pixel)."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None):
        openslide = _openslide()
        self.path = Path(path)
        self.id = slide_id(self.path)
        if not self.path.is_file():
            raise DataError(f"slide {self.path} not found")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise DataError(f"{self.path} is not a slide OpenSlide can read (whole-slide formats: "
                            f"{', '.join(SLIDE_SUFFIXES)}, pyramidal tiled TIFF)") from None
        except openslide.OpenSlideError as exc:
            raise DataError(f"slide {self.path} cannot be read ({exc}); the file may be damaged or incomplete") from None
        self.mpp = float(slide_mpp) if slide_mpp else self._metadata_mpp()
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.downsamples: tuple[float, ...] = tuple(self._osr.level_downsamples)

    def _metadata_mpp(self) -> float:
        props = self._osr.properties
        try:
            mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            raise DataError(f"slide {self.path} has no microns-per-pixel in its metadata; pass --slide-mpp "
                            "(its level-0 resolution, e.g. 0.25 for a 40x scan)") from None
        if mpp_x <= 0 or abs(mpp_x - mpp_y) / mpp_x > 0.01:
            raise DataError(f"slide {self.path}: unusable pixel size {mpp_x} x {mpp_y} um; pass --slide-mpp")
        return mpp_x

    @property
    def vendor(self) -> str:
        return self._osr.properties.get("openslide.vendor", "unknown")

    def level_for(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample`` (a small tolerance
        absorbs the rounding of level sizes, e.g. 2.0003 for a nominal 2)."""
        fine_enough = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.001]
        return max(fine_enough) if fine_enough else 0

    def read_rgb(self, x: int, y: int, size: int, level: int, out_size: int) -> np.ndarray:
        """The level-0 box (x, y, size x size) read at ``level`` as an ``out_size`` square RGB array;
        transparent parts (outside the scanned area) become white."""
        level_size = max(1, int(round(size / self.downsamples[level])))
        try:
            region = self._osr.read_region((int(x), int(y)), level, (level_size, level_size))
        except _openslide().OpenSlideError as exc:
            raise DataError(f"slide {self.path}: cannot read the region at ({x}, {y}) ({exc}); "
                            "the file may be damaged or incomplete") from None
        image = _on_white(region)
        if level_size != out_size:
            image = image.resize((out_size, out_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide shrunk by ``downsample`` (>= 1) as an RGB array, read in strips."""
        downsample = max(1.0, downsample)
        width, height = self.dimensions
        out_w, out_h = max(1, int(width / downsample)), max(1, int(height / downsample))
        level = self.level_for(downsample)
        level_ds = self.downsamples[level]
        level_w, level_h = self._osr.level_dimensions[level]
        rows_per_strip = max(1, int(_MAX_READ_PIXELS / level_w * (level_ds / downsample)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        scale = downsample / level_ds  # level pixels per output pixel
        for top in range(0, out_h, rows_per_strip):
            bottom = min(out_h, top + rows_per_strip)
            first, last = int(top * scale), min(int(np.ceil(bottom * scale)), level_h)
            try:
                region = self._osr.read_region((0, int(first * level_ds)), level, (level_w, max(1, last - first)))
            except _openslide().OpenSlideError as exc:
                raise DataError(f"slide {self.path} cannot be read ({exc}); the file may be damaged or incomplete") from None
            strip = _on_white(region).resize((out_w, bottom - top), Image.Resampling.BILINEAR)
            out[top:bottom] = np.asarray(strip, dtype=np.uint8)
        return out

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _on_white(region: Image.Image) -> Image.Image:
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")
