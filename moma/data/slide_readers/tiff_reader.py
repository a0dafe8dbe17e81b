"""Plain tiled RGB TIFF and OME-TIFF through tifffile: tiles are read from the file and decoded one
by one (JPEG, JPEG 2000, zlib, ... through imagecodecs), so memory stays flat whatever the slide.

Pyramid levels are the reduced-resolution pages (or OME SubIFDs) that tifffile groups under the
first series. TIFFs written by scanners (Aperio, Hamamatsu, Philips, Leica, Ventana) are left to
OpenSlide, which reads their vendor metadata.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
from tifffile import COMPRESSION, PHOTOMETRIC, RESUNIT, TIFF

from moma.data.slide_readers.base import TIFF_SUFFIXES, SlideReader, region_error
from moma.errors import DataError

_VENDOR_FLAGS = {"svs", "ndpi", "scn", "philips", "bif"}
_CACHE_BYTES = 32 * 2**20  # decoded tiles kept: neighbouring regions share tiles
_MICRONS = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
_MICRONS_PER_UNIT = {RESUNIT.CENTIMETER: 1e4, RESUNIT.INCH: 25_400.0}


def _readable(tif: tifffile.TiffFile) -> bool:
    """A tiled, 8-bit RGB image that no scanner wrote and whose compression decodes here."""
    if tif.flags & _VENDOR_FLAGS or not tif.series:
        return False
    series = tif.series[0]
    page = series.keyframe
    colour = page.photometric == PHOTOMETRIC.RGB or (page.photometric == PHOTOMETRIC.YCBCR
                                                     and page.compression == COMPRESSION.JPEG)
    return (series.axes == "YXS" and page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel == 3
            and page.planarconfig == 1 and colour and page.compression in TIFF.DECOMPRESSORS)


class TiffReader(SlideReader):
    name = "tifffile"
    formats = "tiled 8-bit RGB TIFF, pyramidal or not, and OME-TIFF (.tif, .tiff)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return False
        try:
            with tifffile.TiffFile(path) as tif:
                return _readable(tif)
        except Exception:  # not a TIFF tifffile parses: not ours
            return False

    def __init__(self, path: str | Path):
        super().__init__(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise DataError(f"slide {self.path} cannot be read ({exc}); the file may be damaged or incomplete") from None
        if not _readable(self._tif):
            self._tif.close()
            raise DataError(f"{self.path} is not a slide tifffile can read ({self.formats})")
        self._pages = [level.keyframe for level in self._tif.series[0].levels]
        tile_h, tile_w = self._pages[0].chunks[:2]
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_tiles = max(4, _CACHE_BYTES // (tile_h * tile_w * 3))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((page.imagewidth, page.imagelength) for page in self._pages)

    @property
    def mpp(self) -> tuple[float, float] | None:
        return _ome_mpp(self._tif.ome_metadata) if self._tif.is_ome else _tag_mpp(self._pages[0])

    @property
    def vendor(self) -> str:
        return "ome-tiff" if self._tif.is_ome else "tiff"

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        downsample = self.downsamples[level]
        # The nearest level pixel; OpenSlide interpolates between pixels instead (under half a pixel apart).
        left, top = int(np.floor(x / downsample + 0.5)), int(np.floor(y / downsample + 0.5))
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, page.imagewidth), min(top + height, page.imagelength)
        tile_h, tile_w = page.chunks[:2]
        columns = -(-page.imagewidth // tile_w)
        for row in range(y0 // tile_h, -(-y1 // tile_h)):
            for col in range(x0 // tile_w, -(-x1 // tile_w)):
                try:
                    tile = self._tile(level, row * columns + col)
                except Exception as exc:  # tifffile and the codecs raise many kinds: all mean a bad tile
                    raise region_error(self.path, x, y, exc) from None
                if tile is None:
                    continue  # a tile the writer left out: not scanned, white
                ty, tx = row * tile_h, col * tile_w
                a0, a1, b0, b1 = max(y0, ty), min(y1, ty + tile.shape[0]), max(x0, tx), min(x1, tx + tile.shape[1])
                out[a0 - top:a1 - top, b0 - left:b1 - left] = tile[a0 - ty:a1 - ty, b0 - tx:b1 - tx]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tile = self._decode(self._pages[level], index)
        self._cache[key] = tile
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def _decode(self, page: tifffile.TiffPage, index: int) -> np.ndarray | None:
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None
        handle = self._tif.filehandle
        handle.seek(offset)
        data = handle.read(count)
        if len(data) != count:
            raise ValueError(f"tile {index} ends past the end of the file")
        segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return segment[0]  # (depth 1, rows, columns, samples) -> (rows, columns, samples)

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


def _tag_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """From XResolution/YResolution (pixels per centimetre or inch), as OpenSlide reads them."""
    tags = page.tags
    unit = tags.valueof("ResolutionUnit")
    x_res, y_res = tags.valueof("XResolution"), tags.valueof("YResolution")
    if unit not in _MICRONS_PER_UNIT or not x_res or not y_res:
        return None
    per_unit = [numerator / denominator for numerator, denominator in (x_res, y_res) if numerator and denominator]
    if len(per_unit) != 2:
        return None
    return _MICRONS_PER_UNIT[unit] / per_unit[0], _MICRONS_PER_UNIT[unit] / per_unit[1]


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first image's Pixels element, converted to microns."""
    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in _MICRONS:
            return None
        sizes.append(float(value) * _MICRONS[unit])
    return sizes[0], sizes[1]
