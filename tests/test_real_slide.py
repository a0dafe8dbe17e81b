"""A slide written by a real scanner: data/slides/CMU-1-Small-Region.svs (Aperio, JPEG tiles,
vendor metadata, label and macro images; CC0, see data/slides/SOURCE.md). Tiling it, predicting on
it, and using its tiles as an unlabelled pool."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, write_teacher
from moma.cli import main
from moma.data.slides import Slide
from moma.data.tiling import plan_tiles, tissue_mask
from moma.data.unlabelled import scan_pool

SVS = ROOT / "data" / "slides" / "CMU-1-Small-Region.svs"
SLIDE_ID = "CMU-1-Small-Region"
# Measured once (2026-12-06) and checked by eye on docs/images/cmu1_tissue_mask.png: the Otsu mask
# of the 1/8 thumbnail covers 36.4 % of the slide; the band allows for other OpenSlide and
# scikit-image versions.
TISSUE_FRACTION = (0.30, 0.45)


pytestmark = pytest.mark.usefixtures("restore_logging")  # main() installs the CLI's log handler


def test_the_aperio_metadata_gives_vendor_size_and_microns_per_pixel():
    with Slide(SVS) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)  # from the ImageDescription, not a flag
        assert slide.dimensions == (2220, 2967) and slide.downsamples == (1.0,)


def test_tissue_covers_the_measured_share_of_the_slide():
    with Slide(SVS) as slide:
        fraction = float(tissue_mask(slide.thumbnail(8)).mean())
    assert TISSUE_FRACTION[0] < fraction < TISSUE_FRACTION[1], fraction


@pytest.mark.parametrize("mpp, tiles, box", [(0.5, 49, 224), (1.0, 11, 449)])
def test_moma_tile_cuts_the_real_slide_at_two_resolutions(tmp_path, mpp, tiles, box):
    out = tmp_path / f"tiles-{mpp}"
    assert main(["tile", str(SVS), "--out", str(out), "--tile-size", "224", "--tile-mpp", str(mpp)]) == 0
    manifest = pd.read_csv(out / "manifest.csv", dtype={"group": str})
    assert len(manifest) == tiles and set(manifest["group"]) == {SLIDE_ID}
    assert set(manifest["size"]) == {box}  # level-0 pixels per tile: 224 x mpp / 0.499
    assert set(manifest["level"]) == {0}  # the slide has one level: 1.0 um/px is a downsampled read of it
    with Image.open(out / manifest["path"].iloc[0]) as tile:
        assert tile.size == (224, 224) and tile.mode == "RGB"
    with Slide(SVS) as slide:
        assert len(plan_tiles(slide, 224, mpp).frame) == tiles


def test_predict_writes_table_heatmap_and_geojson_for_the_real_slide(tmp_path, capsys):
    checkpoint = write_teacher(tmp_path / "model.safetensors", ["benign", "tumour"])
    out = tmp_path / "pred"
    assert main(["predict", str(checkpoint), str(SVS), "--out", str(out), "--model-mpp", "4.0"]) == 0
    table = pd.read_csv(out / f"{SLIDE_ID}.csv")
    assert len(table) > 10 and {"prob_benign", "prob_tumour"} <= set(table.columns)
    assert (table[["prob_benign", "prob_tumour"]].sum(axis=1) - 1).abs().max() < 1e-4
    with Image.open(out / f"{SLIDE_ID}_heatmap.png") as heatmap:
        assert heatmap.size[0] > 1 and heatmap.size[1] > 1
    collection = json.loads((out / f"{SLIDE_ID}.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(table)


def test_tiles_of_the_real_slide_are_an_unlabelled_pool_grouped_by_slide(tmp_path):
    out = tmp_path / "pool"
    assert main(["tile", str(SVS), "--out", str(out), "--tile-size", "224", "--tile-mpp", "0.5"]) == 0
    pool = scan_pool([str(out)], table=None, split=None, group_column="group")
    assert len(pool) == 49 and set(pool.groups) == {SLIDE_ID}
