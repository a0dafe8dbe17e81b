import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASS_COLOURS, make_tile_folder, write_tile
from moma.config import AugmentConfig
from moma.data.dataset import TileDataset
from moma.data.tiles import scan_tiles
from moma.data.transforms import build_eval_transform, build_train_transform
from moma.data.stain import HEDJitter
from moma.errors import DataError


def test_folder_without_manifest_is_read_as_imagefolder(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=3, manifest=False)
    table = scan_tiles(root)
    assert table.classes == ["immune", "stroma", "tumour"]  # sorted
    assert len(table) == 9 and not table.has_groups
    assert table.frame.groupby("label")["target"].first().to_dict() == {"immune": 0, "stroma": 1, "tumour": 2}


def test_folder_with_manifest_uses_its_groups(tile_folder):
    table = scan_tiles(tile_folder)
    assert table.has_groups and table.frame["group"].nunique() == 12


def test_csv_manifest_paths_are_relative_to_the_csv(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=2, manifest=False)
    (tmp_path / "list.csv").write_text("path,label,split\nd/tumour/tumour_000.png,tumour,train\nd/stroma/stroma_001.png,stroma,test\n")
    table = scan_tiles(tmp_path / "list.csv")
    assert list(table.frame["split"]) == ["train", "test"]
    assert all(p.startswith(str(root.resolve())) for p in table.frame["path"])


def test_png_jpeg_tiff_gray_and_rgba_are_read_as_rgb(tmp_path):
    for name, mode, suffix in (("a", "L", ".png"), ("b", "RGBA", ".png"), ("c", "RGB", ".jpg"), ("d", "RGB", ".tif")):
        write_tile(tmp_path / "x" / f"{name}{suffix}", (120, 40, 200), mode=mode)
        write_tile(tmp_path / "y" / f"{name}{suffix}", (20, 140, 20), mode=mode)
    table = scan_tiles(tmp_path)
    data = TileDataset(table, image_size=16)
    assert len(data) == 8
    assert data.images.shape == (8, 3, 16, 16) and data.images.dtype == torch.uint8


@pytest.mark.parametrize("case, fragment", [
    ("empty_class", "holds no image tiles"),
    ("one_class", "need at least 2"),
    ("missing_file", "not found"),
    ("unknown_label", "not in the class list"),
])
def test_bad_data_names_the_problem(tmp_path, case, fragment):
    root = make_tile_folder(tmp_path / "d", per_class=2, manifest=False)
    classes = None
    if case == "empty_class":
        (root / "empty").mkdir()
    elif case == "one_class":
        root = make_tile_folder(tmp_path / "single", classes=("tumour",), per_class=2, manifest=False)
    elif case == "missing_file":
        (root / "manifest.csv").write_text("path,label\ntumour/tumour_000.png,tumour\ntumour/gone.png,tumour\n")
    elif case == "unknown_label":
        classes = ["tumour", "stroma"]
    with pytest.raises(DataError, match=fragment) as info:
        scan_tiles(root, classes=classes)
    assert "\n" not in str(info.value)
    if case == "missing_file":
        assert "line 3" in str(info.value) and "gone.png" in str(info.value)


def test_corrupt_tile_is_named_or_skipped(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=3, manifest=False)
    bad = root / "tumour" / "broken.png"
    bad.write_bytes(b"this is not a png")
    table = scan_tiles(root)
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        TileDataset(table, image_size=16)
    data = TileDataset(table, image_size=16, skip_bad=True)
    assert data.skipped == [str(bad)] and len(data) == 9


def test_train_transform_keeps_size_and_normalises():
    aug = AugmentConfig(stain_jitter=0.05)
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = build_train_transform(aug)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    evaluated = build_eval_transform(aug)(image)
    expected = (128 / 255 - torch.tensor(aug.mean)) / torch.tensor(aug.std)
    assert torch.allclose(evaluated[:, 0, 0], expected, atol=1e-6)


def test_rotations_and_flips_preserve_pixel_content():
    torch.manual_seed(0)
    aug = AugmentConfig(randaugment=False)
    image = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    transform = build_train_transform(aug)
    reference = build_eval_transform(aug)(image)
    for _ in range(8):
        out = transform(image)
        assert torch.allclose(out.sum(), reference.sum(), atol=1e-2)  # a permutation of the pixels


def test_hed_jitter_zero_is_identity_and_changes_colour_otherwise():
    rgb = torch.from_numpy(np.array(Image.new("RGB", (8, 8), CLASS_COLOURS["tumour"]))).permute(2, 0, 1)
    assert torch.equal(HEDJitter(0.0)(rgb), rgb)
    torch.manual_seed(1)
    jittered = HEDJitter(0.2)(rgb)
    assert jittered.shape == rgb.shape and jittered.dtype == torch.uint8
    assert (jittered.int() - rgb.int()).abs().max() > 0
