"""Slide prediction over a cohort: damaged regions and damaged slides, the summary table, resuming
after a kill, reading in worker processes, and the GeoJSON QuPath imports (read back by
`moma tile --annotations`). Slides are the test TIFFs of slide_helpers.py (32 px tiles at 0.5 um/px,
one layout cell per tile, read from level 1 whose TIFF tiles are 128 px = 4 x 4 cells)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import moma.engine.slide_predict as slide_predict
from conftest import ROOT, write_teacher
from moma.cli import main
from slide_helpers import CELL, cells, damaged_copy, make_slide

SVS = ROOT / "data" / "slides" / "CMU-1-Small-Region.svs"
CLASSES = ["lung_n", "lung_scc"]
TIFF_TILE_CELLS = 4  # a level-1 TIFF tile of 128 px covers 4 x 4 cells of 64 level-0 px
QUPATH_OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}

pytestmark = pytest.mark.usefixtures("restore_logging")  # main() installs the CLI's log handler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("model") / "m.safetensors", CLASSES, mpp=0.5)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("slides") / "s0.tif")


def predict(checkpoint, out, *inputs, workers: int = 0, extra=()) -> int:
    return main(["predict", str(checkpoint), *map(str, inputs), "--out", str(out), "--workers", str(workers), *extra])


def test_damaged_regions_cost_their_tiles_with_one_line_each(checkpoint, slide, tmp_path, capsys):
    # Level-1 TIFF tiles 3 (row 0, col 3) and 4 (row 1, col 0): two regions that do not touch.
    damaged = damaged_copy(slide, tmp_path / "damaged.tif", level=1, tiles=[3, 4])
    bad = {(r, c) for r, c in cells() if (r // TIFF_TILE_CELLS, c // TIFF_TILE_CELLS) in {(0, 3), (1, 0)}}
    assert predict(checkpoint, tmp_path / "p", damaged, workers=2) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "unreadable tile(s) in the level-0 box" in line]
    assert len(lines) == 2, lines
    assert all(line.startswith("damaged: ") and "cannot read the region" in line for line in lines)

    table = pd.read_csv(tmp_path / "p" / "damaged.csv")
    assert sorted(zip(table["y"] // CELL, table["x"] // CELL)) == sorted(set(cells()) - bad)
    row = pd.read_csv(tmp_path / "p" / "slides.csv").iloc[0]
    assert (row["status"], row["tiles"], row["unreadable"]) == ("done", len(cells()) - len(bad), len(bad))
    assert row["reason"] == f"{len(bad)} unreadable tile(s) in 2 region(s) left out"


def test_workers_read_the_same_tiles_as_the_main_process(checkpoint, slide, tmp_path):
    assert predict(checkpoint, tmp_path / "w0", slide, workers=0) == 0
    assert predict(checkpoint, tmp_path / "w2", slide, workers=2, extra=["--batch-size", "7"]) == 0
    serial, parallel = (pd.read_csv(tmp_path / name / "s0.csv") for name in ("w0", "w2"))
    assert len(serial) == len(cells()) and list(serial.columns) == list(parallel.columns)
    pd.testing.assert_frame_equal(serial, parallel)


def test_a_folder_gives_one_summary_and_skips_a_damaged_slide(checkpoint, slide, tmp_path, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(slide, folder / "a.tif")
    make_slide(folder / "b.tif", first_tile=30, seed=1)
    (folder / "broken.svs").write_bytes(SVS.read_bytes()[:SVS.stat().st_size // 2])  # a truncated scan
    assert predict(checkpoint, tmp_path / "p", folder) == 0
    out = capsys.readouterr()
    assert "2 slide(s) predicted" in out.out and "1 skipped" in out.out
    assert sum("broken: skipped: " in line for line in out.err.splitlines()) == 1

    summary = pd.read_csv(tmp_path / "p" / "slides.csv")
    summary["reason"] = summary["reason"].fillna("")
    assert list(summary["slide"]) == ["a", "b", "broken"]
    assert list(summary["status"]) == ["done", "done", "skipped"]
    broken = summary.iloc[2]
    assert "broken.svs is not a slide OpenSlide can read" in broken["reason"] and "\n" not in broken["reason"]
    assert pd.isna(broken["tiles"]) and pd.isna(broken["fraction_lung_n"])
    for _, row in summary.iloc[:2].iterrows():
        table = pd.read_csv(tmp_path / "p" / f"{row['slide']}.csv")
        assert row["tiles"] == len(table) == len(cells()) and row["unreadable"] == 0 and row["reason"] == ""
        assert row["tissue_mm2"] > 0 and (row["level"], row["scale"]) == (1, 1.0)
        assert row["fraction_lung_n"] + row["fraction_lung_scc"] == pytest.approx(1.0, abs=1e-3)
        assert row["mean_prob_lung_scc"] == pytest.approx(table["prob_lung_scc"].mean(), abs=1e-4)
        assert 0 <= row["data_wait"] <= 1 and row["seconds"] > 0

    assert predict(checkpoint, tmp_path / "only_broken", folder / "broken.svs") == 2
    assert "no slide could be predicted" in capsys.readouterr().err


def test_a_killed_run_resumes_slide_by_slide(checkpoint, tmp_path, monkeypatch, capsys):
    slides = [make_slide(tmp_path / "slides" / f"s{i}.tif", first_tile=20 * i, seed=i) for i in range(3)]
    out = tmp_path / "p"
    real_plot = slide_predict.plot_class_map

    def killed_at_s2(thumbnail, ds, frame, names, path, title, **kwargs):
        if title == "s2":
            raise KeyboardInterrupt  # as a kill would: s2's CSV is written, its heatmap not
        real_plot(thumbnail, ds, frame, names, path, title, **kwargs)

    monkeypatch.setattr(slide_predict, "plot_class_map", killed_at_s2)
    assert predict(checkpoint, out, *slides) == 130
    assert "re-running the same command predicts the slides not yet done" in capsys.readouterr().err
    assert list(pd.read_csv(out / "slides.csv")["slide"]) == ["s0", "s1"]
    assert (out / "s2.csv").is_file() and not (out / "s2_heatmap.png").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes: no half files
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(("s0", "s1"))}
    (out / "slides.csv").rename(out / "summary.csv")  # what earlier versions called it: a folder they wrote resumes too

    monkeypatch.setattr(slide_predict, "plot_class_map", real_plot)
    predicted = []
    real_predict = slide_predict._predict_slide
    monkeypatch.setattr(slide_predict, "_predict_slide", lambda path, *a: predicted.append(path.stem) or real_predict(path, *a))
    assert predict(checkpoint, out, *slides) == 0
    assert predicted == ["s2"]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    resumed = pd.read_csv(out / "slides.csv")
    assert predict(checkpoint, tmp_path / "fresh", *slides) == 0
    fresh = pd.read_csv(tmp_path / "fresh" / "slides.csv")
    timing = ["seconds", "data_wait", "path"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), fresh.drop(columns=timing))

    other = write_teacher(tmp_path / "other.safetensors", CLASSES, seed=1, mpp=0.5)
    assert predict(other, out, *slides) == 2
    assert "holds predictions made with another model; use another --out" in capsys.readouterr().err


def _check_qupath_feature(feature: dict, names: list[str]) -> None:
    """The layout QuPath 0.4+ writes and imports for a classified object with measurements."""
    assert feature["type"] == "Feature" and set(feature) >= {"type", "geometry", "properties"}
    geometry = feature["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
    ring = geometry["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5 and all(isinstance(v, int) for point in ring for v in point)
    props = feature["properties"]
    assert props["objectType"] in QUPATH_OBJECT_TYPES
    classification = props["classification"]
    assert classification["name"] in names
    colour = classification["color"]
    assert isinstance(colour, list) and len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
    measurements = props["measurements"]
    assert isinstance(measurements, dict) and {f"prob_{n}" for n in names} <= set(measurements)
    assert all(isinstance(v, float) and np.isfinite(v) for v in measurements.values())


def test_geojson_has_qupath_layout_and_moma_tile_reads_it_back(checkpoint, slide, tmp_path):
    assert predict(checkpoint, tmp_path / "p", slide) == 0
    table = pd.read_csv(tmp_path / "p" / "s0.csv")
    collection = json.loads((tmp_path / "p" / "s0.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(table)
    colours = {}
    for feature in collection["features"]:
        _check_qupath_feature(feature, CLASSES)
        classification = feature["properties"]["classification"]
        assert colours.setdefault(classification["name"], classification["color"]) == classification["color"]

    # The predictions as annotations: every tile of the same grid is labelled with its prediction.
    tiled = tmp_path / "tiles"
    assert main(["tile", str(slide), "--out", str(tiled), "--annotations", str(tmp_path / "p"), "--tile-size", "32",
                 "--tile-mpp", "0.5"]) == 0
    manifest = pd.read_csv(tiled / "manifest.csv").merge(table, on=["x", "y"])
    assert len(manifest) == len(table) and (manifest["label"] == manifest["prediction"]).all()
