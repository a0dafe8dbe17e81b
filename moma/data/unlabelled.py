"""The unlabelled pool: tiles of the user's own slides without labels, for the distillation terms.

Sources (``data.unlabelled``, repeatable ``moma distill --unlabelled``):

- a folder of tiles, searched recursively (class sub-folders, if any, are ignored);
- a manifest CSV with a ``path`` column (a ``label`` column is ignored; a group column is kept);
- the output folder of ``moma tile`` (read through its ``manifest.csv``; the slide is the group);
- ``rest``: the training tiles of the run's split that are outside its labelled subset
  (``data.train_per_class`` / ``train_fraction``), their labels hidden.

The pool is a list of paths (and groups): nothing is decoded up front, a tile is read when a
training step draws it, so a pool of 100,000 tiles costs the memory of its path strings. When the
labelled tiles are in a tile store (``data.cache=disk``), the pool's are read from tile stores too
(:mod:`moma.data.tile_store`: decoded once, read tile by tile, shared by every run and grid cell)
instead of being decoded again on every draw.

Leakage guard: a pool tile that is also a validation or test tile (the same file, or a file with
the same bytes) is refused, naming it; when both sides know their groups (patients, slides), a
group shared with validation or test is refused unless ``data.allow_group_overlap``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from moma.data.dataset import decode_tile
from moma.data.splits import UNUSED
from moma.data.tile_store import TileStore, locate, open_tile_store
from moma.data.tiles import IMAGE_SUFFIXES, MANIFEST_NAME, TileTable
from moma.data.transforms import NO_VIEW, transform_with_view
from moma.errors import DataError

log = logging.getLogger(__name__)

REST = "rest"  # the pool source that means "the split's training tiles outside the labelled subset"


@dataclass
class PoolTable:
    """The pool's tiles: absolute paths and, where known, a group (patient or slide) per tile."""

    paths: np.ndarray  # of str
    groups: np.ndarray | None  # of str, "" where unknown; None when no source has groups
    sources: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _walk_images(root: Path) -> list[str]:
    """Image files under ``root``, sorted, without building Path objects per file (fast on 100k files)."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return found


def _read_pool_manifest(csv_path: Path, group_column: str | None) -> tuple[list[str], list[str] | None]:
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"unlabelled manifest {csv_path}: not a readable CSV ({exc})") from None
    column = "path" if "path" in frame.columns else "file" if "file" in frame.columns else None
    if column is None:
        raise DataError(f"unlabelled manifest {csv_path}: needs a 'path' column (has: {', '.join(frame.columns)})")
    base = csv_path.parent
    paths = [os.path.normpath(os.path.join(base, rel)) for rel in frame[column]]
    groups = frame[group_column].tolist() if group_column and group_column in frame.columns else None
    return paths, groups


def _read_source(source: str, group_column: str | None) -> tuple[list[str], list[str] | None]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"unlabelled source {source} not found (a folder of tiles, a manifest CSV, `moma tile` "
                        f"output, or '{REST}')")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _read_pool_manifest(path / MANIFEST_NAME, group_column)
    if path.is_dir():
        return [os.path.abspath(p) for p in _walk_images(path)], None
    if path.suffix.lower() == ".csv":
        return _read_pool_manifest(path.resolve(), group_column)
    raise DataError(f"unlabelled source {source}: expected a folder of tiles, a manifest CSV or '{REST}'")


def source_paths(source: str) -> list[str]:
    """The tile paths of one source (a folder searched recursively, a manifest CSV, `moma tile`
    output), absolute: what ``moma embed`` computes a teacher's outputs for."""
    return _read_source(source, None)[0]


def _rest_of_split(table: TileTable, split: pd.DataFrame) -> tuple[list[str], list[str] | None]:
    """The training tiles outside the labelled subset (split.csv's ``unused`` rows)."""
    unused = set(split.loc[split["split"] == UNUSED, "rel_path"])
    rows = table.frame[table.frame["rel_path"].isin(unused)]
    groups = rows["group"].astype(str).tolist() if table.has_groups else None
    return rows["path"].tolist(), groups


def scan_pool(sources: Iterable[str], table: TileTable, split: pd.DataFrame, group_column: str | None) -> PoolTable:
    """The pool of all ``sources``, duplicates (the same file named twice) removed."""
    sources = list(sources)
    paths: list[str] = []
    groups: list[str] = []
    any_groups = False
    for source in sources:
        found, found_groups = (_rest_of_split(table, split) if source == REST
                               else _read_source(source, group_column))
        if not found:
            where = "the split has no training tiles outside the labelled subset (set data.train_per_class)" \
                if source == REST else "no image tiles found"
            raise DataError(f"unlabelled source {source}: {where}")
        paths += found
        any_groups |= found_groups is not None
        groups += found_groups if found_groups is not None else [""] * len(found)
    frame = pd.DataFrame({"path": paths, "group": groups}).drop_duplicates("path")
    return PoolTable(frame["path"].to_numpy(dtype=object), frame["group"].to_numpy(dtype=object) if any_groups else None,
                     sources)


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.blake2b(handle.read(), digest_size=16).hexdigest()


def check_pool_leakage(pool: PoolTable, held_out: TileTable, allow_group_overlap: bool) -> None:
    """Refuse a pool tile that is a validation or test tile (same file, or the same bytes under
    another name), and a group shared with them unless allowed. Only files whose size equals a
    held-out file's size are hashed, so a large pool costs one ``stat`` per tile."""
    held_paths = [os.path.realpath(p) for p in held_out.frame["path"]]
    held_set = set(held_paths)
    for path in pool.paths:
        if os.path.realpath(path) in held_set:
            raise DataError(f"unlabelled tile {path} is also a validation/test tile; remove it from the pool "
                            "(tiles the model is judged on must not be trained on)")
    sizes: dict[int, list[str]] = {}
    for path in held_paths:
        sizes.setdefault(os.path.getsize(path), []).append(path)
    digests: dict[str, str] = {}
    for path in pool.paths:
        try:
            same_size = sizes.get(os.path.getsize(path))
        except OSError:
            continue  # a missing file is reported (or skipped) when it is read
        if not same_size:
            continue
        for other in same_size:
            if other not in digests:
                digests[other] = _digest(other)
        digest = _digest(path)
        twin = next((other for other in same_size if digests[other] == digest), None)
        if twin is not None:
            raise DataError(f"unlabelled tile {path} has the same content as the validation/test tile {twin}; "
                            "remove it from the pool")
    if pool.groups is None or not held_out.has_groups:
        return
    shared = sorted(set(pool.groups) & set(held_out.frame["group"].astype(str)) - {""})
    if shared and not allow_group_overlap:
        raise DataError(f"unlabelled pool shares group(s) {', '.join(shared[:5])} (patients/slides) with the "
                        "validation/test tiles; remove them from the pool, or pass --allow-group-overlap "
                        "(data.allow_group_overlap=true) if that is intended")
    if shared:
        log.warning("unlabelled pool shares %d group(s) with validation/test (allowed by data.allow_group_overlap)",
                    len(shared))


def open_pool_stores(paths: Sequence[str], sources: Sequence[str], table_store: TileStore | None, image_size: int,
                     store_dir: str | Path, progress: bool = False) -> list[TileStore]:
    """Stores that hold every tile of an unlabelled pool: the labelled source's store for the tiles
    it holds (a 'rest' pool, or a pool folder that is the labelled one), and one store of the other
    sources' tiles, named after those sources (so it is the same store whatever the split)."""
    stores = [] if table_store is None else [table_store]
    outside = [p for p, row in zip(paths, locate(paths, stores)[1]) if row < 0]
    if outside:
        named = sorted(os.path.abspath(s) for s in sources if s != REST)
        stores.append(open_tile_store(outside, image_size, store_dir, "|".join(named) or "unlabelled", progress,
                                      "unlabelled tiles"))
    return stores


class UnlabelledDataset(Dataset):
    """Yields ``(image_or_views, index, skipped_path)``, decoding a tile only when it is asked for;
    a training transform (one that draws a flip/rotation view) adds the view number.

    ``item`` is ``(row, seed)`` as from :class:`~moma.engine.distributed.PoolSampler`. An unreadable
    tile is never raised in a loader worker (where its message would come wrapped in a traceback):
    the next readable tile stands in and the bad path comes back as ``skipped_path``; the training
    loop counts it with ``data.skip_bad`` and stops with a one-line error without it."""

    def __init__(self, pool: PoolTable, image_size: int, transform: Callable | None = None,
                 stores: Sequence[TileStore] = ()):
        """``stores``: tile stores holding some or all of the pool's tiles (read from there, not
        decoded); a tile none of them holds is decoded from its file."""
        self.paths = pool.paths
        self.image_size = image_size
        self.transform = transform
        self.view_choices: np.ndarray | None = None  # per row, as TileDataset.view_choices
        self.stores = list(stores)
        self.store_of, self.store_rows = locate(self.paths, self.stores)

    def __len__(self) -> int:
        return len(self.paths)

    def _first_readable(self, index: int) -> tuple[int, torch.Tensor, str]:
        bad = ""
        for attempt in range(min(len(self.paths), 16)):
            row = (index + attempt) % len(self.paths)
            try:
                return row, self._read(row), bad
            except DataError:
                bad = bad or str(self.paths[row])
        raise DataError(f"unlabelled pool: 16 tiles in a row from {self.paths[index]} are unreadable")

    def _read(self, row: int) -> torch.Tensor:
        which = int(self.store_of[row])
        if which < 0:
            return decode_tile(self.paths[row], self.image_size)
        store, store_row = self.stores[which], int(self.store_rows[row])
        if store_row in store.bad:
            raise DataError(store.bad[store_row])
        return store.read(store_row)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        try:
            row, image, bad = self._first_readable(index)
        except DataError:  # 16 unreadable in a row: a black stand-in, and the loop stops on the bad path
            row, image, bad = index, torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), str(self.paths[index])
        view = NO_VIEW
        if self.transform is not None:
            choices = None if self.view_choices is None else self.view_choices[row]
            image, view = transform_with_view(self.transform, image, choices, seed)
        return (image, row, bad) if view == NO_VIEW else (image, row, bad, view)
