"""Slide readers: the tifffile reader against OpenSlide on the same generated files, the choice of a
reader for a file, OME-TIFF, and a toy reader that a plugin registers without editing the package."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import ROOT, write_teacher
from moma.cli import main
from moma.data.slide_readers import OpenSlideReader, TiffReader, open_reader, reader_for, readers, registry
from moma.data.slides import collect_slides, is_slide_file
from moma.errors import ConfigError
from slide_helpers import CELL, cells, pyramid, slide_pixels

SVS = ROOT / "data" / "slides" / "CMU-1-Small-Region.svs"
# (level-0 x, y, level, width, height): inside one tile, across tile borders, past the slide's edges.
REGIONS = [(64, 128, 0, 32, 32), (192, 64, 0, 160, 140), (448, 256, 1, 100, 90), (-64, -32, 1, 80, 60),
           (800, 480, 0, 200, 100), (0, 0, 2, 224, 128), (768, 384, 2, 64, 64)]


def write_tiff(path: Path, compression: str, levels: int = 3, mpp: float = 0.25, **kwargs) -> Path:
    with tifffile.TiffWriter(path) as tif:
        for level, pixels in enumerate(pyramid(slide_pixels(), levels)):
            per_cm = 1e4 / (mpp * 2**level)
            tif.write(pixels, tile=(128, 128), photometric="rgb", compression=compression, subfiletype=int(level > 0),
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **kwargs)
    return path


@pytest.mark.parametrize("compression, tolerance", [("zlib", 0), ("jpeg", 4)])
def test_tifffile_reads_the_same_pixels_as_openslide(tmp_path, compression, tolerance):
    path = write_tiff(tmp_path / f"{compression}.tif", compression)
    assert reader_for(path) is TiffReader  # a plain TIFF goes to tifffile
    with open_reader(path) as tiff, open_reader(path, "openslide") as osr:
        assert (tiff.level_dimensions, tiff.downsamples, tiff.mpp) == (osr.level_dimensions, osr.downsamples, osr.mpp)
        assert (tiff.vendor, osr.vendor) == ("tiff", "generic-tiff")
        for x, y, level, width, height in REGIONS:
            ours, theirs = tiff.read_region(x, y, level, width, height), osr.read_region(x, y, level, width, height)
            assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
            assert np.abs(ours.astype(int) - theirs).max() <= tolerance, (x, y, level)
        assert np.abs(tiff.thumbnail(3.0).astype(int) - osr.thumbnail(3.0)).max() <= tolerance
    if compression == "zlib":  # lossless: the written pixels themselves, white outside the slide
        levels = pyramid(slide_pixels(), 3)
        with open_reader(path) as tiff:
            np.testing.assert_array_equal(tiff.read_region(448, 256, 1, 100, 90), levels[1][128:218, 224:324])
            corner = tiff.read_region(-64, -32, 1, 80, 60)
            assert (corner[:16] == 255).all() and (corner[:, :32] == 255).all()
            np.testing.assert_array_equal(corner[16:, 32:], levels[1][:44, :48])


def test_ome_tiff_levels_and_resolution_come_from_its_metadata(tmp_path):
    levels = pyramid(slide_pixels(), 3)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb", compression="zlib",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for pixels in levels[1:]:
            tif.write(pixels, subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    with open_reader(path) as reader:
        assert isinstance(reader, TiffReader) and reader.vendor == "ome-tiff" and reader.mpp == (0.5, 0.5)
        assert reader.level_dimensions == ((896, 512), (448, 256), (224, 128))
        np.testing.assert_array_equal(reader.read_region(256, 128, 2, 40, 30), levels[2][32:62, 64:104])


def test_each_file_goes_to_the_reader_that_understands_it(tmp_path):
    assert reader_for(SVS) is OpenSlideReader  # a scanner's TIFF keeps its vendor metadata
    striped = tmp_path / "tile.tif"  # a plain tile image, not a slide
    tifffile.imwrite(striped, slide_pixels()[:64, :64], photometric="rgb")
    assert reader_for(striped) is None and not is_slide_file(striped)
    assert [reader.name for reader in readers()][-2:] == ["tifffile", "openslide"]
    with pytest.raises(ConfigError, match="unknown slide reader 'bioformats'"):
        open_reader(SVS, "bioformats")


# ------------------------------------------------- a plugin's reader: one file, outside the package
PLUGIN = '''
"""A toy slide format: a NumPy RGB array saved as .toyslide, one level at 0.25 um/px."""
import numpy as np
from moma.data.slides import SlideReader, register_reader


@register_reader
class ToyReader(SlideReader):
    name = "toy"
    formats = "toy slides (.toyslide)"

    @classmethod
    def can_open(cls, path):
        return path.suffix == ".toyslide"

    def __init__(self, path):
        super().__init__(path)
        self.pixels = np.load(self.path)

    @property
    def level_dimensions(self):
        return ((self.pixels.shape[1], self.pixels.shape[0]),)

    @property
    def mpp(self):
        return 0.25, 0.25

    @property
    def vendor(self):
        return "toy"

    def read_region(self, x, y, level, width, height):
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        part = self.pixels[max(y, 0):y + height, max(x, 0):x + width]
        out[max(-y, 0):max(-y, 0) + part.shape[0], max(-x, 0):max(-x, 0) + part.shape[1]] = part
        return out

    def close(self):
        pass
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The plugin module written to a folder outside the package and imported; the registry is
    restored afterwards."""
    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "toy_slide_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    monkeypatch.delitem(sys.modules, "toy_slide_plugin", raising=False)
    return importlib.import_module("toy_slide_plugin")


@pytest.mark.usefixtures("restore_logging")
def test_a_plugin_registers_a_toy_reader_that_tiling_and_prediction_use(toy_plugin, tmp_path):
    pixels = slide_pixels()
    (tmp_path / "slides").mkdir()
    with open(tmp_path / "slides" / "toy1.toyslide", "wb") as file:  # np.save on a path would add .npy
        np.save(file, pixels)
    assert readers()[0] is toy_plugin.ToyReader
    assert collect_slides([tmp_path / "slides"]) == [tmp_path / "slides" / "toy1.toyslide"]

    out = tmp_path / "tiles"
    assert main(["tile", str(tmp_path / "slides"), "--out", str(out), "--tile-size", "32", "--tile-mpp", "0.5",
                 "--workers", "2"]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(zip(manifest["y"] // CELL, manifest["x"] // CELL)) == sorted(cells())
    assert (manifest["level"] == 0).all()  # one level: each 64 px box is read and shrunk to 32
    row = manifest.iloc[0]
    expected = Image.fromarray(pixels[row.y:row.y + CELL, row.x:row.x + CELL]).resize((32, 32), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(Image.open(out / row.path)), np.asarray(expected))

    checkpoint = write_teacher(tmp_path / "model.safetensors", ["lung_n", "lung_scc"], mpp=0.5)
    assert main(["predict", str(checkpoint), str(tmp_path / "slides"), "--out", str(tmp_path / "pred"), "--workers", "1"]) == 0
    assert len(pd.read_csv(tmp_path / "pred" / "toy1.csv")) == len(cells())
