"""The teacher cache: a frozen teacher's outputs per tile and flip/rotation view, computed once.

A frozen teacher that sees a pure view of a tile (the stain-normalised tile in one of its 8
flip/rotation views, :mod:`moma.data.views`, with no photometric change) gives outputs that depend
on the tile and the view only. ``moma embed`` (or ``distill.teacher_cache``) computes them once, and
training steps read them instead of running the teacher: with a foundation-model teacher that costs
tens of student steps per forward pass, the teacher then costs one forward per tile and view for the
whole grid instead of one per step, epoch and cell.

What a cache folder holds (nothing in it is pickled):

- ``index.json``: the fingerprint (below), the number of tiles, views per tile, the widths of the
  logits and of the embedding, the shard size;
- ``tiles.csv``: one row per tile: its resolved path, size in bytes and modification time (ns);
- ``views.npy``: (tiles, views per tile) int8, the view numbers stored for each tile;
- ``shard-00000.npy``, ...: float32 (tiles of the shard, views per tile, logits + embedding),
  memory-mapped when read. Each is written to a temporary file and renamed when complete, so a
  shard file that exists is whole: an interrupted ``moma embed`` keeps its finished shards and
  computes only the missing ones when it is run again.

The logits are the teacher's, in the teacher's class order (the task reorders them to the student's,
as it does for the live teacher's); a features-only teacher stores none, its logits being its
embedding. The embedding is the pooled pre-logits vector every method reads
(``TapOutputs.embedding``). Both are computed in float32 with the teacher in eval mode; a live
teacher under ``train.amp`` (bf16 on CUDA) differs from them by its rounding.

**The fingerprint.** A cache serves a run only if it was made with the same teacher weights (a hash
of every tensor of the state dict), architecture, input normalisation and classes, the same image
size and stain normalisation, and views that cover the run's flips and rotations; otherwise it is
refused in one line naming what differs. Tiles are keyed by resolved path, size and modification
time rather than a hash of their bytes: checking a run's tiles then costs one ``stat`` each, where
hashing would read every byte of every tile (of a pool that may hold a million) at the start of
every run; a tile rewritten in place gets a new modification time and is refused. Every tile a run
trains on (its training split and its unlabelled pool) must be in the cache; a cache may hold more
(a whole folder's tiles serve runs on any of its subsets).

**Views.** By default every view of the group is stored (``--views all``: the 8 views, or in
``teacher_cache=auto`` the run's own flips and rotations). ``--views N`` stores N views per tile
drawn once, seeded, from the 8; training then draws each tile's view from its N, so the student
still sees exactly the view whose teacher outputs it reads.

This module holds the folder's names, the fingerprint and tile keys, and the reader;
:mod:`moma.engine.teacher_cache_write` writes a cache (``moma embed``) and
:mod:`moma.engine.teacher_cache_run` finds or makes a run's cache and binds it to the run's batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moma.data.stain_norm import StainReference
from moma.data.views import NUM_VIEWS
from moma.engine.builder import Teacher
from moma.errors import ConfigError, DataError
from moma.models.taps import TapOutputs
from moma.models.vit_layouts import imported_build

FORMAT = 1
INDEX_NAME = "index.json"
TILES_NAME = "tiles.csv"
VIEWS_NAME = "views.npy"
LOCK_NAME = ".lock"
DEFAULT_DIR = "teacher_cache"
ALL_VIEWS = tuple(range(NUM_VIEWS))

# Fingerprint entries and how a refusal names them.
FINGERPRINT_LABELS = {
    "format": "cache format",
    "teacher_weights": "teacher weights",
    "teacher_arch": "teacher architecture",
    "teacher_build": "teacher build arguments",
    "teacher_mean": "teacher input mean",
    "teacher_std": "teacher input std",
    "teacher_classes": "teacher classes",
    "image_size": "image size",
    "stain_normalize": "stain normalisation",
    "views": "views",
    "views_per_tile": "views per tile",
    "view_seed": "view seed",
}
SHOWN_VALUES = ("teacher_arch", "image_size", "views", "views_per_tile", "view_seed", "format")


# ----------------------------------------------------------------------------- fingerprints


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor of a state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """What turns a tile file into the teacher's input, besides the teacher itself."""

    image_size: int
    stain: StainReference | None = None
    views: tuple[int, ...] = ALL_VIEWS  # the views the cache draws from
    views_per_tile: int | None = None  # None: every view of ``views``; N: a seeded subset of N per tile
    view_seed: int = 0

    @property
    def stored_per_tile(self) -> int:
        return len(self.views) if self.views_per_tile is None else self.views_per_tile


def fingerprint(teacher: Teacher, prep: Preprocessing) -> dict:
    """Everything a cached output depends on besides the tile: compared entry by entry on use."""
    meta = teacher.meta
    stain = None if prep.stain is None else json.loads(json.dumps(prep.stain.to_dict()))
    return {
        "format": FORMAT,
        "teacher_weights": weights_digest(teacher.state),
        "teacher_arch": meta.arch,
        "teacher_build": json.loads(json.dumps(imported_build(meta), default=str)),
        "teacher_mean": [float(v) for v in meta.mean],
        "teacher_std": [float(v) for v in meta.std],
        "teacher_classes": list(meta.class_names),
        "image_size": prep.image_size,
        "stain_normalize": stain,
        "views": list(prep.views),
        "views_per_tile": prep.stored_per_tile,
        "view_seed": prep.view_seed,
    }


def differences(stored: dict, wanted: dict) -> list[str]:
    """The fingerprint entries that differ, in words (``image size 32 (this run: 64)``)."""
    out = []
    for key, label in FINGERPRINT_LABELS.items():
        if stored.get(key) != wanted.get(key):
            shown = f" {stored.get(key)} (this run: {wanted.get(key)})" if key in SHOWN_VALUES else ""
            out.append(label + shown)
    return out


def tile_keys(paths) -> pd.DataFrame:
    """``path`` (resolved), ``size`` and ``mtime_ns`` of each distinct tile, sorted by path."""
    resolved = sorted({os.path.realpath(p) for p in paths})
    sizes, mtimes = [], []
    for path in resolved:
        try:
            stat = os.stat(path)
        except OSError:
            raise DataError(f"tile {path} not found: the teacher cache is computed for existing tiles only") from None
        sizes.append(stat.st_size)
        mtimes.append(stat.st_mtime_ns)
    return pd.DataFrame({"path": resolved, "size": sizes, "mtime_ns": mtimes})


def tiles_digest(keys: pd.DataFrame) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path, size, mtime in keys.itertuples(index=False):
        digest.update(f"{path}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def default_name(teacher: Teacher, wanted: dict, keys: pd.DataFrame) -> str:
    """``<teacher arch>-<hash of fingerprint and tiles>``: one folder per teacher, preprocessing and tile set."""
    digest = hashlib.blake2b(json.dumps(wanted, sort_keys=True).encode() + tiles_digest(keys).encode(), digest_size=6)
    return f"{teacher.meta.arch}-{digest.hexdigest()}"



# ----------------------------------------------------------------------------- the folder


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def read_index(folder: Path) -> dict | None:
    """A cache folder's index, or None where the folder holds no cache yet (an empty one, or its lock only)."""
    path = folder / INDEX_NAME
    if not path.is_file():
        if folder.exists() and any(p.name != LOCK_NAME for p in folder.iterdir()):
            raise ConfigError(f"teacher cache folder {folder} exists and holds no {INDEX_NAME}: not a teacher cache; "
                              "choose a new folder")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"teacher cache {folder}: unreadable {INDEX_NAME} ({exc}); delete the folder and run again") from None



# ----------------------------------------------------------------------------- reading


def missing_shards(folder: Path, index: dict) -> list[int]:
    """The shard numbers of ``index`` whose file ``folder`` does not hold yet."""
    return [n for n in range(index["shards"]) if not (folder / shard_name(n)).is_file()]


class TeacherCache:
    """A complete cache folder, read through memory maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise ConfigError(f"teacher cache {self.folder}: no {INDEX_NAME}; make it with `moma embed`")
        self.index = index
        missing = missing_shards(self.folder, index)
        if missing:
            raise DataError(f"teacher cache {self.folder} is incomplete ({len(missing)} of {index['shards']} shards "
                            "missing); run the same `moma embed` again to finish it")
        keys = pd.read_csv(self.folder / TILES_NAME, dtype={"path": str}, keep_default_na=False)
        self.keys = keys
        self.row_of = {path: row for row, path in enumerate(keys["path"])}
        self.views = np.load(self.folder / VIEWS_NAME, allow_pickle=False)
        self.slot_of = np.full((len(keys), NUM_VIEWS), -1, dtype=np.int8)
        for slot in range(self.views.shape[1]):
            self.slot_of[np.arange(len(keys)), self.views[:, slot]] = slot
        self._shards: dict[int, np.ndarray] = {}

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._shards:
            self._shards[number] = np.load(self.folder / shard_name(number), mmap_mode="r", allow_pickle=False)
        return self._shards[number]

    def rows(self, paths) -> np.ndarray:
        """The cache row of each tile path; refuses tiles that are not in the cache or changed since."""
        resolved = [os.path.realpath(p) for p in paths]
        rows = np.array([self.row_of.get(p, -1) for p in resolved], dtype=np.int64)
        missing = [p for p, r in zip(resolved, rows) if r < 0]
        changed = [] if missing else self._changed(resolved, rows)
        if missing or changed:
            bad = missing or changed
            what = "are not in it" if missing else "changed since it was made (size or modification time)"
            raise ConfigError(f"teacher cache {self.folder}: {len(bad)} of the run's tiles {what}, e.g. {bad[0]}; "
                              "make a cache of this data (`moma embed TEACHER DATA`, or distill.teacher_cache=auto)")
        return rows

    def _changed(self, resolved: list[str], rows: np.ndarray) -> list[str]:
        sizes, mtimes = self.keys["size"].to_numpy(), self.keys["mtime_ns"].to_numpy()
        out = []
        for path, row in zip(resolved, rows):
            stat = os.stat(path)
            if stat.st_size != sizes[row] or stat.st_mtime_ns != mtimes[row]:
                out.append(path)
        return out

    def read(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """(len(rows), logits + embedding) float32 for each (cache row, view)."""
        slots = self.slot_of[rows, views]
        if (slots < 0).any():
            bad = int(np.flatnonzero(slots < 0)[0])
            raise DataError(f"teacher cache {self.folder}: no outputs for view {int(views[bad])} of tile "
                            f"{self.keys['path'][rows[bad]]}")
        size = self.index["shard_tiles"]
        out = np.empty((len(rows), self.index["logits_width"] + self.index["embedding_width"]), dtype=np.float32)
        shards = rows // size
        for number in np.unique(shards):
            chosen = shards == number
            out[chosen] = self._shard(int(number))[rows[chosen] % size, slots[chosen]]
        if np.isnan(out).any():
            bad = int(np.flatnonzero(np.isnan(out).any(axis=1))[0])
            raise DataError(f"teacher cache {self.folder}: tile {self.keys['path'][rows[bad]]} was unreadable when the "
                            "cache was made; fix it and make the cache again, or leave it out (--skip-bad)")
        return out

    def outputs(self, rows: np.ndarray, views: np.ndarray, device: torch.device) -> TapOutputs:
        """The cached teacher outputs as the live teacher gives them (logits in the teacher's class order)."""
        block = torch.from_numpy(self.read(rows, views)).to(device, non_blocking=True)
        width = self.index["logits_width"]
        embedding = block[:, width:]
        return TapOutputs(logits=block[:, :width] if width else embedding, embedding=embedding)
