"""Finding tiles: an ImageFolder-style folder or a CSV manifest becomes one table.

The table has one row per tile with the columns ``path`` (absolute), ``rel_path`` (as written by
the user, relative to the folder or manifest), ``label``, ``target`` (class index) and, where the
data has them, ``group`` (patient or slide id) and ``split`` (train/val/test).

A folder that holds a ``manifest.csv`` is read through that manifest, so the patient ids it
carries are used for splitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from moma.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MANIFEST_NAME = "manifest.csv"
SPLITS = ("train", "val", "test")


@dataclass
class TileTable:
    """All tiles of a data source, with the class list that maps labels to indices."""

    source: Path
    frame: pd.DataFrame
    classes: list[str]

    @property
    def has_groups(self) -> bool:
        return "group" in self.frame.columns

    @property
    def has_split(self) -> bool:
        return "split" in self.frame.columns

    def __len__(self) -> int:
        return len(self.frame)

    def subset(self, mask) -> "TileTable":
        return TileTable(self.source, self.frame[mask].reset_index(drop=True), self.classes)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_rgb(path: str | Path) -> Image.Image:
    """Open a tile as RGB (grayscale, palette and RGBA are converted); errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"tile {path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"tile {path}: cannot read image ({exc}); fix or remove it, or pass --skip-bad") from None


def _scan_folder(root: Path) -> pd.DataFrame:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data folder {root}: no class sub-folders (expected <folder>/<class>/<tile>.png)")
    rows = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if is_image_file(p))
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no image tiles ({', '.join(IMAGE_SUFFIXES)}); "
                "add tiles or remove the folder"
            )
        rows += [(str(f), str(f.relative_to(root)), class_dir.name) for f in files]
    return pd.DataFrame(rows, columns=["path", "rel_path", "label"])


def _read_manifest(csv_path: Path, group_column: str | None) -> pd.DataFrame:
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"manifest {csv_path}: not a readable CSV ({exc})") from None
    path_column = "path" if "path" in frame.columns else "file" if "file" in frame.columns else None
    if path_column is None or "label" not in frame.columns:
        raise DataError(
            f"manifest {csv_path}: needs the columns 'path' and 'label' (has: {', '.join(frame.columns)})"
        )
    if frame.empty:
        raise DataError(f"manifest {csv_path}: no rows")
    base = csv_path.parent
    out = pd.DataFrame({"rel_path": frame[path_column], "label": frame["label"].str.strip()})
    out["path"] = [str((base / rel).resolve()) for rel in out["rel_path"]]
    for row, (rel, path) in enumerate(zip(out["rel_path"], out["path"]), start=2):
        if not rel:
            raise DataError(f"manifest {csv_path} line {row}: empty path")
        if not Path(path).is_file():
            raise DataError(f"manifest {csv_path} line {row}: file {rel} not found (paths are relative to the manifest)")
    if (out["label"] == "").any():
        row = int(np.flatnonzero(out["label"] == "")[0]) + 2
        raise DataError(f"manifest {csv_path} line {row}: empty label")
    if "split" in frame.columns:
        split = frame["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 2
            raise DataError(f"manifest {csv_path} line {row}: split {frame['split'].iloc[row - 2]!r} is not one of {SPLITS}")
        out["split"] = split.values
    if group_column and group_column in frame.columns:
        out["group"] = frame[group_column].values
    return out[[c for c in ("path", "rel_path", "label", "group", "split") if c in out.columns]]


def scan_tiles(source: str | Path, classes: list[str] | None = None, group_column: str | None = "group") -> TileTable:
    """Read a data source into a :class:`TileTable`, checking everything a user can get wrong."""
    if source is None:
        raise DataError("no data source: set data.source to a folder of class sub-folders or a manifest CSV")
    source = Path(source)
    if not source.exists():
        raise DataError(f"data source {source} not found")
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        frame = _read_manifest(source / MANIFEST_NAME, group_column)
    elif source.is_dir():
        frame = _scan_folder(source)
    elif source.suffix.lower() == ".csv":
        frame = _read_manifest(source, group_column)
    else:
        raise DataError(f"data source {source}: expected a folder or a .csv manifest")

    found = sorted(frame["label"].unique())
    if classes:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"data source {source}: label(s) {', '.join(unknown)} not in the class list "
                f"({', '.join(classes)}); add them to data.classes or fix the labels"
            )
        class_list = list(classes)
    else:
        class_list = found
    if len(class_list) < 2:
        raise DataError(f"data source {source}: found {len(class_list)} class(es) ({', '.join(class_list)}); need at least 2")
    index = {name: i for i, name in enumerate(class_list)}
    frame["target"] = frame["label"].map(index).astype(int)
    return TileTable(source, frame.reset_index(drop=True), class_list)
