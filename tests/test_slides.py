"""Whole slides: the reader, tissue tiling, annotation labels, slide prediction and the CLI, on a
pyramidal TIFF made at test time from real shipped tiles (see slide_helpers.py for the layout)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from moma.cli import main
from moma.data.annotations import label_tiles, read_annotations
from moma.data.slides import Slide, collect_slides
from moma.data.tiling import TilingOptions, tile_slides
from moma.errors import DataError
from slide_helpers import (CELL, CLASSES, LAYOUT, cells, damaged_copy, layout_annotations, make_slide, pyramid, slide_pixels,
                           write_slide)

# Tiles of 32 px at 0.5 um/px on a 0.25 um/px slide: one layout cell per tile, read from level 1.
TILE = ["--tile-size", "32", "--tile-mpp", "0.5"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("slides") / "s0.tif")


pytestmark = pytest.mark.usefixtures("restore_logging")  # main() installs the CLI's log handler


def truth(x, y) -> str:
    return CLASSES[LAYOUT[y // CELL][x // CELL]]


@pytest.mark.parametrize("reader, vendor", [(None, "tiff"), ("openslide", "generic-tiff")])
def test_reader_reads_the_level_closest_to_the_mpp_and_resizes_the_rest(slide, reader, vendor):
    levels = pyramid(slide_pixels(), 3)
    with Slide(slide, reader=reader) as s:  # a plain TIFF goes to tifffile unless OpenSlide is named
        assert (s.mpp, s.dimensions, s.downsamples, s.vendor) == (0.25, (14 * CELL, 8 * CELL), (1.0, 2.0, 4.0), vendor)
        assert [s.level_for(d) for d in (0.5, 1, 1.5, 2, 3, 4, 9)] == [0, 0, 0, 1, 1, 2, 2]
        # 0.5 um/px = level 1 exactly: the pixels of level 1, untouched.
        exact = s.read_rgb(3 * CELL, 2 * CELL, CELL, level=1, out_size=32)
        np.testing.assert_array_equal(exact, levels[1][64:96, 96:128])
        # 0.75 um/px: read at level 1 (0.5), then shrunk from 48 to 32 px.
        box = 96  # 32 px * 0.75 / 0.25
        between = s.read_rgb(3 * CELL, 2 * CELL, box, level=s.level_for(box / 32), out_size=32)
        expected = Image.fromarray(levels[1][64:112, 96:144]).resize((32, 32), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(between, np.asarray(expected))


def test_tiling_finds_the_tissue_tiles_and_only_them(slide, tmp_path):
    summary = tile_slides([slide], tmp_path / "a", TilingOptions(tile_size=32, mpp=0.5, progress=False))
    manifest = pd.read_csv(tmp_path / "a" / "manifest.csv")
    found = sorted(zip(manifest["y"] // CELL, manifest["x"] // CELL))
    assert found == sorted(cells()) and summary.tiles == len(cells()) == 51 and summary.written == 51
    assert (manifest["group"] == "s0").all() and (manifest["label"] == "unlabelled").all()
    assert (manifest["level"] == 1).all() and (manifest["size"] == CELL).all()
    row = manifest.iloc[0]
    tile = np.asarray(Image.open(tmp_path / "a" / row["path"]))
    np.testing.assert_array_equal(tile, pyramid(slide_pixels(), 2)[1][row["y"] // 2:row["y"] // 2 + 32, row["x"] // 2:row["x"] // 2 + 32])

    # Re-running writes nothing; two worker processes write the same tiles.
    again = tile_slides([slide], tmp_path / "a", TilingOptions(tile_size=32, mpp=0.5, progress=False))
    assert (again.written, again.skipped_existing) == (0, 51)
    tile_slides([slide], tmp_path / "b", TilingOptions(tile_size=32, mpp=0.5, workers=2, progress=False))
    assert pd.read_csv(tmp_path / "b" / "manifest.csv").equals(manifest)
    for path in manifest["path"]:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    with pytest.raises(DataError, match="holds tiles of 32 px at 0.5 um/px"):
        tile_slides([slide], tmp_path / "a", TilingOptions(tile_size=64, mpp=0.5, progress=False))


def test_annotations_give_the_labels_of_the_regions(slide, tmp_path):
    layout_annotations(tmp_path / "ann" / "s0.geojson")
    options = TilingOptions(tile_size=32, mpp=0.5, annotations=tmp_path / "ann", progress=False)
    tile_slides([slide], tmp_path / "out", options)
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == 51
    assert list(manifest["label"]) == [truth(x, y) for x, y in zip(manifest["x"], manifest["y"])]

    # Only the lung_n regions annotated: the other tissue is skipped, or labelled when asked.
    only_a = tuple(line.replace("B", ".") for line in LAYOUT)
    layout_annotations(tmp_path / "ann_a" / "s0.geojson", only_a)
    skipped = tile_slides([slide], tmp_path / "c", TilingOptions(tile_size=32, mpp=0.5, annotations=tmp_path / "ann_a",
                                                                  progress=False))
    assert skipped.tiles == len(cells(letter="A")) == 23
    tile_slides([slide], tmp_path / "d", TilingOptions(tile_size=32, mpp=0.5, annotations=tmp_path / "ann_a",
                                                       unlabelled="other", progress=False))
    labels = pd.read_csv(tmp_path / "d" / "manifest.csv")["label"].value_counts().to_dict()
    assert labels == {"other": 28, "lung_n": 23}


def test_label_rules_by_centre_and_by_overlap():
    regions = {"tumour": shapely.box(0, 0, 100, 64), "stroma": shapely.box(100, 0, 300, 64)}
    x, y, size = np.array([0, 64, 128]), np.zeros(3), np.full(3, 64)
    # tile 2 covers 36/64 = 56 % tumour and 28/64 = 44 % stroma; its centre (96) lies in tumour.
    assert list(label_tiles(regions, x, y, size, "centre")) == ["tumour", "tumour", "stroma"]
    assert list(label_tiles(regions, x, y, size, "overlap", min_overlap=0.5)) == ["tumour", "tumour", "stroma"]
    assert list(label_tiles(regions, x, y, size, "overlap", min_overlap=0.6)) == ["tumour", None, "stroma"]
    outside = label_tiles(regions, np.array([400]), np.array([0]), np.array([64]), "centre")
    assert list(outside) == [None]


def test_geojson_as_qupath_writes_it(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    multi = {"type": "MultiPolygon", "coordinates": [[[[20, 0], [30, 0], [30, 10], [20, 0]]], [[[40, 0], [50, 0], [50, 10], [40, 0]]]]}
    features = [{"type": "Feature", "geometry": square, "properties": {"classification": {"name": "tumour", "colorRGB": -1}}},
                {"type": "Feature", "geometry": multi, "properties": {"classification": "stroma"}},
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {"classification": {"name": "x"}}}]
    (tmp_path / "list.geojson").write_text(json.dumps(features))
    regions = read_annotations(tmp_path / "list.geojson")
    assert sorted(regions) == ["stroma", "tumour"]
    assert regions["tumour"].area == 100 and regions["stroma"].area == 100
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(DataError, match="bad.geojson: not a readable GeoJSON"):
        read_annotations(tmp_path / "bad.geojson")


def one_line_error(capsys, argv, fragment) -> None:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("moma: error")]
    assert len(err) == 1 and fragment in err[0], err


def test_bad_slides_give_one_line_errors(slide, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(capsys, ["tile", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o"), *TILE],
                   "notes.txt is not a slide any reader can open")
    (tmp_path / "fake.svs").write_bytes(b"II*\x00garbage")
    one_line_error(capsys, ["tile", str(tmp_path / "fake.svs"), "--out", str(tmp_path / "o"), *TILE],
                   "fake.svs is not a slide OpenSlide can read")
    one_line_error(capsys, ["tile", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *TILE], "none not found")

    no_mpp = write_slide(tmp_path / "no_mpp.tif", slide_pixels(), mpp=None)
    one_line_error(capsys, ["tile", str(no_mpp), "--out", str(tmp_path / "o"), *TILE], "pass --slide-mpp")
    assert main(["tile", str(no_mpp), "--out", str(tmp_path / "o"), "--slide-mpp", "0.25", *TILE]) == 0
    assert len(pd.read_csv(tmp_path / "o" / "manifest.csv")) == 51

    damaged = damaged_copy(slide, tmp_path / "damaged.tif", level=1)
    for workers in ("0", "2"):
        one_line_error(capsys, ["tile", str(damaged), "--out", str(tmp_path / f"d{workers}"), "--workers", workers, *TILE],
                       "damaged.tif: cannot read the region")
    with pytest.raises(DataError, match="holds no slides"):
        collect_slides([tmp_path / "o"])


def test_predict_slide_errors(slide, tmp_path, capsys):
    from conftest import write_teacher

    ckpt = write_teacher(tmp_path / "t.safetensors", ["lung_n", "lung_scc"])  # 32 px, no mpp recorded
    out = ["--out", str(tmp_path / "p")]
    one_line_error(capsys, ["predict", str(ckpt), str(slide), *out], "does not record the microns per pixel")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(capsys, ["predict", str(ckpt), str(tmp_path / "notes.txt"), "--model-mpp", "0.5", *out], "is not a slide")
    one_line_error(capsys, ["predict", str(ckpt), str(slide), "--model-mpp", "0.5", "--heatmap-class", "fat", *out],
                   "--heatmap-class fat: not a class")


def test_tile_train_predict_end_to_end(tmp_path):
    """`moma tile` three annotated slides, `moma train` on the tiles, `moma predict` a fourth slide
    made of other tiles: the predicted layout is the drawn one, the GeoJSON fits the slide."""
    from test_cli import moma

    slides = [make_slide(tmp_path / "slides" / f"s{i}.tif", first_tile=30 * i, seed=i) for i in range(4)]
    for i in range(3):
        layout_annotations(tmp_path / "ann" / f"s{i}.geojson")
    tiled = moma("tile", *slides[:3], "--out", tmp_path / "tiles", "--annotations", tmp_path / "ann", "--workers", "2", *TILE)
    assert tiled.returncode == 0, tiled.stderr
    assert "3 slide(s): 153 tiles (153 written, 0 already there)" in tiled.stdout

    trained = moma("train", "--data", tmp_path / "tiles", "--arch", "test_resnet", "--image-size", "32", "--epochs", "5",
                   "--batch-size", "16", "--out", tmp_path / "runs", "--name", "slides", "--set", "data.mpp=0.5",
                   "--set", "data.val_fraction=0.34", "--set", "data.test_fraction=0", "--set", "train.progress=false",
                   "--set", "train.tensorboard=false", "--set", "augment.randaugment=false")
    assert trained.returncode == 0, trained.stderr
    split = pd.read_csv(tmp_path / "runs" / "slides" / "split.csv")
    assert split.groupby("group")["split"].nunique().max() == 1  # a slide stays on one side

    out = tmp_path / "pred"
    predicted = moma("predict", tmp_path / "runs" / "slides", slides[3], "--out", out, "--heatmap-class", "lung_scc",
                     "--workers", "1")
    assert predicted.returncode == 0, predicted.stderr
    tiles = pd.read_csv(out / "s3.csv")
    assert list(tiles.columns) == ["x", "y", "level", "size", "tissue", "prediction", "prob_lung_n", "prob_lung_scc"]
    assert sorted(zip(tiles["y"] // CELL, tiles["x"] // CELL)) == sorted(cells())
    correct = (tiles["prediction"] == [truth(x, y) for x, y in zip(tiles["x"], tiles["y"])]).mean()
    assert correct >= 0.9, f"only {correct:.0%} of the tissue tiles of the held-out slide are right"
    np.testing.assert_allclose(tiles[["prob_lung_n", "prob_lung_scc"]].sum(axis=1), 1.0, atol=1e-5)

    collection = json.loads((out / "s3.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(tiles)
    slide_box = shapely.box(0, 0, 14 * CELL, 8 * CELL)
    for feature, row in zip(collection["features"], tiles.itertuples()):
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and slide_box.contains(polygon) and polygon.area == CELL * CELL
        assert polygon.bounds == (row.x, row.y, row.x + CELL, row.y + CELL)
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == row.prediction
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["prob_lung_scc"] == pytest.approx(row.prob_lung_scc)

    summary = pd.read_csv(out / "slides.csv")
    weights = tiles["tissue"] / tiles["tissue"].sum()
    assert summary.loc[0, "slide"] == "s3" and summary.loc[0, "tiles"] == 51
    assert summary.loc[0, "fraction_lung_scc"] == pytest.approx(weights[tiles["prediction"] == "lung_scc"].sum(), abs=1e-4)
    for png in ("s3_heatmap.png", "s3_heatmap_lung_scc.png"):
        with Image.open(out / png) as image:
            assert image.width > 400 and image.height > 200


def test_thumbnail_in_strips_matches_the_thumbnail_in_one_piece(slide, monkeypatch):
    import moma.data.slide_readers.base as slides_module

    with Slide(slide) as s:
        whole = s.thumbnail(2.0).astype(int)
        monkeypatch.setattr(slides_module, "MAX_READ_PIXELS", 448 * 10)  # strips of 10 rows of level 1
        strips = s.thumbnail(2.0).astype(int)
    assert whole.shape == strips.shape == (256, 448, 3)
    np.testing.assert_array_equal(whole, pyramid(slide_pixels(), 2)[1])  # downsample 2 = level 1 as it is
    assert np.abs(whole - strips).max() <= 1
