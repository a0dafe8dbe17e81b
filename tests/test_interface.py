"""One interface across sub-commands: flag spellings, train without distillation flags, far-off
tile sizes said once, a cache that cannot exhaust memory, and outputs that are never overwritten."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import make_tile_folder
from moma.cli import build_parser, main
from moma.data.dataset import TileDataset, choose_storage, reset_size_warning
from moma.data.tiles import scan_tiles
from slide_helpers import make_slide

pytestmark = pytest.mark.usefixtures("restore_logging")


def options(command: str) -> set[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {flag for action in sub._actions for flag in action.option_strings}


def test_train_shows_no_distillation_flags_and_distill_keeps_them(capsys):
    distill_only = {"--method", "--teacher", "--unlabelled", "--allow-group-overlap"}
    assert not distill_only & options("train")
    assert distill_only <= options("distill")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert not any(flag in shown for flag in distill_only)
    with pytest.raises(SystemExit):
        main(["train", "--method", "kd"])
    assert "unrecognized arguments: --method" in capsys.readouterr().err


def test_one_spelling_per_concept():
    every = {command: options(command) for command in ("train", "distill", "evaluate", "predict", "tile",
                                                       "import-teacher", "export", "compare")}
    assert all("--out" in flags for flags in every.values())
    assert not any({"--output-dir", "--num-workers", "--mpp"} & flags for flags in every.values())
    assert {"--workers"} <= every["train"] & every["predict"] & every["tile"]
    assert "--data-mpp" in every["evaluate"] and "--tile-mpp" in every["tile"]
    assert "--model-mpp" in every["predict"] & every["import-teacher"]
    assert "--slide-mpp" in every["predict"] & every["tile"]


def test_far_off_tile_size_is_resized_with_one_warning(tmp_path, caplog):
    table = scan_tiles(make_tile_folder(tmp_path / "small", per_class=3, size=16))
    reset_size_warning()
    with caplog.at_level(logging.WARNING, logger="moma.data.dataset"):
        dataset = TileDataset(table, 64, cache=True)
    assert dataset.raw_image(0).shape == (3, 64, 64)
    warnings = [r.getMessage() for r in caplog.records if "data.image_size" in r.getMessage()]
    assert len(warnings) == 1 and "16x16 px" in warnings[0] and "64 px" in warnings[0], warnings


def test_tile_within_twice_the_size_is_resized_silently(tmp_path, caplog):
    table = scan_tiles(make_tile_folder(tmp_path / "near", per_class=2, size=32))
    reset_size_warning()
    with caplog.at_level(logging.WARNING, logger="moma.data.dataset"):
        TileDataset(table, 64, cache=False).raw_image(0)
    assert not [r for r in caplog.records if "data.image_size" in r.getMessage()]


def test_cache_auto_keeps_tiles_in_memory_then_on_disk_then_nowhere_as_budgets_allow(caplog):
    tile = 3 * 224 * 224
    with caplog.at_level(logging.INFO, logger="moma.data.dataset"):
        assert choose_storage("auto", 1000, 224, 1000 * tile, 0) == "memory"
        assert choose_storage("auto", 1001, 224, 1000 * tile, 2000 * tile) == "disk"
        assert choose_storage("auto", 2001, 224, 1000 * tile, 2000 * tile) == "off"
        assert choose_storage("auto", 10, 224, None, None) == "off"
    assert len([r for r in caplog.records if "data.cache=auto" in r.getMessage()]) == 4
    assert choose_storage("memory", 10**9, 224, 0, 0) == "memory" and choose_storage("off", 1, 8, 10**12, 0) == "off"
    # the store holds the whole source: a subsample that fits is not enough when the source does not
    assert choose_storage("auto", 1001, 224, 1000 * tile, 2000 * tile, store_tiles=2001) == "off"
    assert choose_storage("auto", 1001, 224, 1000 * tile, 2000 * tile, store_tiles=2000) == "disk"


def refused(capsys, argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("moma: error")]
    assert len(lines) == 1 and fragment in lines[0] and "choose another --out" in lines[0], lines


@pytest.mark.parametrize("command", [["predict", "ckpt.safetensors", "TILES"], ["export", "ckpt.safetensors"],
                                     ["import-teacher", "weights.pth", "--features-only"]])
def test_an_existing_output_file_is_not_overwritten(tmp_path, capsys, command):
    tiles = make_tile_folder(tmp_path / "tiles", per_class=2)
    out = tmp_path / ("student.onnx" if command[0] == "export" else "out.csv")
    out.write_text("earlier\n")
    argv = [str(tiles) if arg == "TILES" else str(tmp_path / arg) if "." in arg else arg for arg in command]
    refused(capsys, [*argv, "--out", str(out)], str(out))
    assert out.read_text() == "earlier\n"


def test_tile_and_slide_predict_refuse_a_foreign_folder(tmp_path, capsys):
    slide = make_slide(tmp_path / "slides" / "s1.tif")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine\n")
    refused(capsys, ["tile", str(slide), "--out", str(other)], "tiling.json")
    refused(capsys, ["predict", str(tmp_path / "ckpt.safetensors"), str(slide), "--out", str(other)], "prediction.json")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
