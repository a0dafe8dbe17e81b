"""The model's resolution is enforced: a checkpoint trained at 0.5 um/px reads a finer slide at the
matching pyramid level (or shrinks it), refuses a coarser one in one line unless upsampling is
asked for, and the summary says at which level and scale each slide was read."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import write_teacher
from moma.cli import main
from slide_helpers import make_slide
from test_slides import one_line_error

pytestmark = pytest.mark.usefixtures("restore_logging")  # main() installs the CLI's log handler

READ_COLUMNS = ["slide_mpp", "level", "level_mpp", "model_mpp", "scale"]
# At 2 um/px a 32 px tile at 0.5 um/px is 8 slide pixels: a small layout keeps the tile count low.
SMALL = ("......", ".AABB.", ".AABB.", "......")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("model") / "model.safetensors", ["lung_n", "lung_scc"], mpp=0.5)


def predict(model, slide, out, *flags) -> pd.Series:
    assert main(["predict", str(model), str(slide), "--out", str(out), *flags]) == 0
    tiles = pd.read_csv(out / f"{slide.stem}.csv")
    summary = pd.read_csv(out / "slides.csv").iloc[0]
    assert set(tiles["level"]) == {summary["level"]}
    return summary


@pytest.mark.parametrize("slide_mpp, level, level_mpp, scale", [
    (0.25, 1, 0.5, 1.0),  # level 1 of a 0.25 scan is the model's resolution: read as it is
    (0.3, 0, 0.3, 0.6),  # level 1 (0.6) would be too coarse: level 0, shrunk
    (0.54, 0, 0.54, 1.08),  # within 10 %: accepted, hardly enlarged
])
def test_a_finer_slide_is_read_at_the_right_level(model, tmp_path, slide_mpp, level, level_mpp, scale):
    slide = make_slide(tmp_path / "slide.tif", mpp=slide_mpp)
    summary = predict(model, slide, tmp_path / "pred")
    assert summary[READ_COLUMNS].tolist() == pytest.approx([slide_mpp, level, level_mpp, 0.5, scale])


def test_a_coarser_slide_is_refused_unless_upsampling_is_asked_for(model, tmp_path, capsys):
    slide = make_slide(tmp_path / "coarse.tif", layout=SMALL, mpp=2.0)
    one_line_error(capsys, ["predict", str(model), str(slide), "--out", str(tmp_path / "refused")],
                   "coarse.tif is scanned at 2 um/px, coarser than the model's 0.5 um/px")
    assert not (tmp_path / "refused").exists()
    one_line_error(capsys, ["tile", str(slide), "--out", str(tmp_path / "tiles"), "--tile-size", "32", "--tile-mpp", "0.5"],
                   "coarser than the 0.5 um/px asked for (--tile-mpp): its tiles would be upsampled; tile at the slide's "
                   "resolution or coarser, or pass --allow-upsampling")
    assert not (tmp_path / "tiles").exists()

    summary = predict(model, slide, tmp_path / "pred", "--allow-upsampling")
    assert summary[READ_COLUMNS].tolist() == pytest.approx([2.0, 0, 2.0, 0.5, 4.0])
    assert main(["tile", str(slide), "--out", str(tmp_path / "tiles"), "--tile-size", "32", "--tile-mpp", "0.5",
                 "--allow-upsampling"]) == 0
    assert main(["tile", str(slide), "--out", str(tmp_path / "tiles-2"), "--tile-size", "32", "--tile-mpp", "2"]) == 0
    assert set(pd.read_csv(tmp_path / "tiles-2" / "manifest.csv")["size"]) == {32}  # at its own resolution: as it is
