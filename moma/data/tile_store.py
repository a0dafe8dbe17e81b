"""Decoded tiles on disk: every tile of a data source decoded once into one uint8 array that every
later run reads from (``data.cache=disk``).

Decoding a PNG or JPEG tile and resizing it to ``data.image_size`` is most of what a loader does
per tile when augmentation is light, and a cache of decoded tiles in memory must fit in memory and
is rebuilt by every run. A tile store does the decoding once:

- one store per (data source, image size): ``tiles.npy``, a uint8 array ``[N, 3, S, S]`` (channels
  first, the layout the transforms take, so a tile is one contiguous read) of every tile resized to
  ``S`` x ``S`` and nothing else: stain normalisation and augmentation still happen on every read.
  It is a plain ``.npy`` file: ``numpy.load(path, mmap_mode="r")`` opens it as a memory map;
- read tile by tile with positioned reads (``pread``) into fresh buffers: the bytes pass through the
  kernel's page cache, which every process reading the store (loader workers, the shard processes
  of a comparison grid) shares and which the kernel drops under memory pressure, and never stay in
  a process's resident memory (a memory map would count every page ever touched there), so a store
  larger than memory cannot exhaust it and a process's peak memory stays flat however much it reads;
- ``tiles.json`` beside it: format version, image size, the row order (each tile as its path
  relative to the store's root folder, file size and mtime_ns), the unreadable tiles with their
  error, and a fingerprint of all of it. A store whose fingerprint differs from the files on disk
  (a tile changed, added or removed) is rebuilt, with one log line;
- built by the first process that needs it under an exclusive lock (``.lock`` in its folder) while
  the others wait and then read it; streamed tile by tile (memory stays flat) into a temporary file
  that is renamed into place when complete, the sidecar written after it, both atomically: an
  interrupted build leaves nothing that is ever read, and the next run builds again;
- kept in ``data.tile_store_dir`` (default ``$XDG_CACHE_HOME/moma/tile_store``, else
  ``~/.cache/moma/tile_store``), one folder per store named after the source, the size and a hash
  of the source's absolute path: every run and every cell of a ``moma compare`` grid that reads the
  same source at the same size reads the same store. Delete a folder to reclaim its space.

An unreadable tile is recorded when the store is built (its row holds zeros and is never read):
with ``data.skip_bad`` the dataset skips it as it does when decoding; without it the run stops with
the tile's one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moma.data.dataset import decode_tile
from moma.data.tiles import TileTable
from moma.errors import DataError
from moma.utils.io import atomic_path
from moma.utils.locks import exclusive

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAY_NAME = "tiles.npy"
SIDECAR_NAME = "tiles.json"
LOCK_NAME = ".lock"
# data.cache=auto builds a store only while it takes at most this share of the free disk space.
AUTO_DISK_SHARE = 0.5
SHARED_MODE = 0o644  # a store folder may serve other users' runs: readable by all
MISSING = -1  # size and mtime of a tile file that cannot be stat'ed (recorded as unreadable)

TileKey = tuple[str, int, int]  # path relative to the store's root, file size, mtime_ns


def default_store_dir() -> Path:
    """Where stores live unless data.tile_store_dir says otherwise: the user's cache folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "moma" / "tile_store"


def resolve_store_dir(setting: str | None) -> Path:
    """data.tile_store_dir, or the default when it is not set."""
    return default_store_dir() if setting is None else Path(setting).expanduser()


def store_folder(store_dir: str | Path, identity: str, image_size: int) -> Path:
    """The folder of the store of ``identity`` (a data source's absolute path) at ``image_size``."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(identity).stem)[:40] or "tiles"
    return Path(store_dir) / f"{stem}-{image_size}px-{digest}"


def tile_keys(paths: Sequence[str], root: str) -> list[TileKey]:
    """(relative path, size, mtime_ns) of every tile: what the fingerprint is made of."""
    keys: list[TileKey] = []
    for path in paths:
        try:
            stat = os.stat(path)
            keys.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
        except OSError:
            keys.append((os.path.relpath(path, root), MISSING, MISSING))
    return keys


def fingerprint(keys: Sequence[TileKey], image_size: int) -> str:
    payload = json.dumps({"version": FORMAT_VERSION, "image_size": image_size, "tiles": [list(k) for k in keys]},
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def store_bytes(num_tiles: int, image_size: int) -> int:
    return num_tiles * 3 * image_size * image_size


def free_bytes(store_dir: str | Path) -> int | None:
    """Free space where ``store_dir`` is (or would be created), or None where it cannot be told."""
    folder = Path(store_dir).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_budget(store_dir: str | Path) -> int | None:
    """What data.cache=auto may fill where stores are kept: a share of the free space."""
    free = free_bytes(store_dir)
    return None if free is None else int(free * AUTO_DISK_SHARE)


class TileStore:
    """A built store, read-only: tile ``row`` as a uint8 CHW tensor; ``bad`` maps the rows of
    unreadable tiles to their error. Tiles are read with positioned reads (``pread``) into fresh
    buffers: they pass through the kernel's page cache, shared by every process, and never stay in
    a process's resident memory. Pickles without its open file (a spawned loader worker opens its own)."""

    def __init__(self, folder: Path, root: str, keys: list[str], image_size: int, bad: dict[int, str]):
        self.folder = folder
        self.root = root
        self.keys = keys
        self.image_size = image_size
        self.bad = bad
        self.built = False  # True in the process that built it
        self.tile_bytes = 3 * image_size * image_size
        self._fd: int | None = None
        self._offset = 0  # where the array starts in the file, after the .npy header
        self._shape: tuple[int, ...] = ()
        self._row_of: dict[str, int] | None = None  # absolute path -> row, built on first use, not pickled

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def path(self) -> Path:
        return self.folder / ARRAY_NAME

    @property
    def array(self) -> np.ndarray:
        """The whole store as a read-only memory map (for inspection; reading goes through ``read``)."""
        return np.load(self.path, mmap_mode="r")

    def shape(self) -> tuple[int, ...]:
        """The array's shape as its .npy header gives it (opens the file)."""
        self._open()
        return self._shape

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """The store row of each path (-1 where the store does not hold it)."""
        if self._row_of is None:  # built once: every split, the pool and its locate ask
            self._row_of = {os.path.normpath(os.path.join(self.root, key)): row for row, key in enumerate(self.keys)}
        return np.array([self._row_of.get(os.path.abspath(p), -1) for p in paths], dtype=np.int64)

    def read(self, row: int) -> torch.Tensor:
        out = np.empty((3, self.image_size, self.image_size), dtype=np.uint8)
        self._read_into(int(row), out)
        return torch.from_numpy(out)

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Several tiles, ``[len(rows), 3, S, S]`` uint8, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), 3, self.image_size, self.image_size), dtype=np.uint8)
        for position in np.argsort(rows, kind="stable"):  # in file order
            self._read_into(int(rows[position]), out[position])
        return torch.from_numpy(out)

    def _open(self) -> int:
        if self._fd is None:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                self._shape, _, _ = read_header(handle)
                self._offset = handle.tell()
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def _read_into(self, row: int, out: np.ndarray) -> None:
        fd = self._open()
        offset = self._offset + row * self.tile_bytes
        if hasattr(os, "preadv"):
            done = os.preadv(fd, [memoryview(out).cast("B")], offset)
        else:  # pragma: no cover - Windows: no pread
            out[...] = self.array[row]
            done = self.tile_bytes
        if done != self.tile_bytes:
            raise DataError(f"tile store {self.folder}: row {row} is cut short; delete the folder and run again")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_row_of": None}


def locate(paths: Sequence[str], stores: Sequence[TileStore]) -> tuple[np.ndarray, np.ndarray]:
    """For each path, the first store that holds it and its row there (both -1 where none does)."""
    which = np.full(len(paths), -1, dtype=np.int64)
    rows = np.full(len(paths), -1, dtype=np.int64)
    for number, store in enumerate(stores):
        found = store.rows_of(paths)
        new = (which < 0) & (found >= 0)
        which[new], rows[new] = number, found[new]
    return which, rows


def open_tile_store(paths: Sequence[str], image_size: int, store_dir: str | Path, identity: str,
                    progress: bool = False, description: str = "tiles") -> TileStore:
    """The store of ``paths`` at ``image_size``: the one on disk when its fingerprint matches the
    files, else built now (once, under a lock shared with every other process that asks)."""
    paths = [os.path.abspath(p) for p in paths]
    root = common_root(paths)
    keys = tile_keys(paths, root)
    wanted = fingerprint(keys, image_size)
    folder = store_folder(Path(store_dir).expanduser(), identity, image_size)
    store = _open_built(folder, wanted)
    if store is not None:
        log.info("tile store %s: %d %s at %d px, built earlier", folder, len(store), description, image_size)
        return store
    with exclusive(folder / LOCK_NAME):
        store = _open_built(folder, wanted)  # built by another process while this one waited
        if store is None:
            _build(folder, paths, root, keys, wanted, image_size, progress, description)
            store = _open_built(folder, wanted)
            if store is None:
                raise DataError(f"tile store {folder}: unreadable right after it was built; delete the folder "
                                "and run again")
            store.built = True
    return store


def common_root(paths: Sequence[str]) -> str:
    root = os.path.commonpath(paths)
    return os.path.dirname(root) if len(paths) == 1 or os.path.isfile(root) else root


def _read_sidecar(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SIDECAR_NAME).read_text())
    except (OSError, ValueError):
        return None


def _open_built(folder: Path, wanted: str) -> TileStore | None:
    """The store in ``folder`` if it is complete and its fingerprint is ``wanted``."""
    sidecar = _read_sidecar(folder)
    if sidecar is None or sidecar.get("fingerprint") != wanted or sidecar.get("version") != FORMAT_VERSION:
        return None
    size = int(sidecar["image_size"])
    keys = [tile[0] for tile in sidecar["tiles"]]
    bad = {int(row): message for row, message in sidecar["bad"].items()}
    store = TileStore(folder, sidecar["root"], keys, size, bad)
    try:
        shape = store.shape()
    except (OSError, ValueError):
        return None
    if shape != (len(keys), 3, size, size) or store.path.stat().st_size != store._offset + len(keys) * store.tile_bytes:
        store.close()
        return None
    return store


def _build(folder: Path, paths: list[str], root: str, keys: list[TileKey], wanted: str, image_size: int,
           progress: bool, description: str) -> None:
    _say_if_stale(folder, keys, wanted)
    _check_free_space(folder, store_bytes(len(paths), image_size))
    _remove_leftovers(folder)
    with atomic_path(folder / ARRAY_NAME) as tmp:
        bad = _write_tiles(tmp, paths, image_size, progress, description)
        tmp.chmod(SHARED_MODE)
    sidecar = {"version": FORMAT_VERSION, "fingerprint": wanted, "image_size": image_size, "root": root,
               "layout": "N,3,S,S uint8", "bad": {str(row): message for row, message in bad.items()},
               "tiles": [list(key) for key in keys]}
    with atomic_path(folder / SIDECAR_NAME) as tmp:
        tmp.write_text(json.dumps(sidecar, separators=(",", ":")) + "\n")
        tmp.chmod(SHARED_MODE)
    log.info("tile store %s: %d %s decoded once at %d px (%.2f GiB)%s", folder, len(paths), description, image_size,
             store_bytes(len(paths), image_size) / 2**30, f", {len(bad)} unreadable" if bad else "")


def _say_if_stale(folder: Path, keys: list[TileKey], wanted: str) -> None:
    old = _read_sidecar(folder)
    if old is None or "tiles" not in old:
        return
    if old.get("fingerprint") == wanted:
        log.warning("tile store %s: its array is missing or damaged: rebuilding it", folder)
        return
    before = {tile[0]: tuple(tile) for tile in old["tiles"]}
    now = {key[0]: key for key in keys}
    changed = sum(1 for rel, key in now.items() if rel in before and before[rel] != key)
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    log.warning("tile store %s is stale (%d tile(s) changed, %d added, %d removed since it was built, or another "
                "image size or format): rebuilding it", folder, changed, added, removed)


def _check_free_space(folder: Path, needed: int) -> None:
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DataError(f"tile store {folder}: needs {needed / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free there; "
                        "set data.tile_store_dir to a larger disk, or data.cache=off")


def _remove_leftovers(folder: Path) -> None:
    """The sidecar of the store about to be replaced (so nothing reads a half-replaced store) and
    the temporary files of builds that were killed (the lock is held: no build is running)."""
    (folder / SIDECAR_NAME).unlink(missing_ok=True)
    for leftover in folder.glob(f".{ARRAY_NAME}.*.tmp"):
        leftover.unlink(missing_ok=True)


def _write_tiles(target: Path, paths: list[str], image_size: int, progress: bool, description: str) -> dict[int, str]:
    """Decode every tile into an .npy file at ``target``, one tile at a time; the rows of unreadable
    tiles hold zeros and their errors are returned."""
    shape = (len(paths), 3, image_size, image_size)
    blank = bytes(3 * image_size * image_size)
    bad: dict[int, str] = {}
    with open(target, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for row, path in enumerate(tqdm(paths, desc=f"tile store: decoding {description}", disable=not progress,
                                        leave=False)):
            try:
                handle.write(decode_tile(path, image_size).numpy().tobytes())
            except DataError as exc:
                bad[row] = str(exc)
                handle.write(blank)
    return bad


def open_table_store(table: TileTable, image_size: int, store_dir: str | Path, progress: bool = False) -> TileStore:
    """The store of every tile of a data source (all splits and folds: one store serves them all)."""
    return open_tile_store(table.frame["path"].tolist(), image_size, store_dir, os.path.abspath(table.source),
                           progress, "labelled tiles")

