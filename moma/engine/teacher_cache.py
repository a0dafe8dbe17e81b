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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moma.config import AugmentConfig, Config
from moma.data.dataset import decode_tile
from moma.data.stain_norm import StainNormalizer, StainReference
from moma.data.transforms import normalize_transform, training_views
from moma.data.views import NUM_VIEWS, apply_view
from moma.distill.base import DistillMethod
from moma.engine.builder import DataBundle, Teacher
from moma.errors import ConfigError, DataError
from moma.models.taps import FeatureTap, TapOutputs
from moma.models.vit_layouts import imported_build
from moma.utils.io import atomic_path, atomic_write_json, atomic_write_text
from moma.utils.locks import exclusive

log = logging.getLogger(__name__)

FORMAT = 1
INDEX_NAME = "index.json"
TILES_NAME = "tiles.csv"
VIEWS_NAME = "views.npy"
LOCK_NAME = ".lock"
DEFAULT_DIR = "teacher_cache"
DEFAULT_SHARD_TILES = 1024
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


# ----------------------------------------------------------------------------- writing


def _view_table(num_tiles: int, prep: Preprocessing) -> np.ndarray:
    """(tiles, views per tile) int8: every view of ``prep.views``, or a seeded subset of N per tile."""
    views = np.asarray(prep.views, dtype=np.int8)
    if prep.views_per_tile is None:
        return np.tile(views, (num_tiles, 1))
    if not 1 <= prep.views_per_tile <= len(views):
        raise ConfigError(f"views per tile must be 1 to {len(views)}, not {prep.views_per_tile}")
    rng = np.random.default_rng(prep.view_seed)
    return np.stack([np.sort(rng.choice(views, prep.views_per_tile, replace=False)) for _ in range(num_tiles)])


class _TileReader(Dataset):
    """uint8 tiles (stain-normalised when asked), by cache row; an unreadable tile is flagged, not raised."""

    def __init__(self, paths: list[str], image_size: int, stain: StainReference | None):
        self.paths = paths
        self.image_size = image_size
        self.normalizer = None if stain is None else StainNormalizer(stain)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            tile = decode_tile(self.paths[row], self.image_size)
        except DataError:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), row, False
        return (tile if self.normalizer is None else self.normalizer(tile)), row, True


def _in_views(tiles: torch.Tensor, views: np.ndarray) -> torch.Tensor:
    """Each tile of the batch in its own view."""
    out = tiles.clone()
    for view in np.unique(views):
        chosen = torch.from_numpy(views == view)
        out[chosen] = apply_view(tiles[chosen], int(view))
    return out


def _forward_teacher(tap: FeatureTap, images: torch.Tensor) -> TapOutputs:
    """The frozen teacher on one batch, float32, eval mode (one place, so tests can count calls)."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return tap(images)


@dataclass
class CacheWriter:
    """Computes a cache's missing shards."""

    folder: Path
    teacher: Teacher
    prep: Preprocessing
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        self.tap = FeatureTap(self.teacher.tap.model.to(self.device).eval())  # no intermediate maps
        self.normalize = normalize_transform(AugmentConfig(mean=tuple(self.teacher.meta.mean),
                                                           std=tuple(self.teacher.meta.std)))
        self.forwards = 0  # teacher forward passes (batches) run by this writer

    def widths(self) -> tuple[int, int]:
        """(logits stored, embedding) widths; a features-only teacher stores no logits."""
        size = self.prep.image_size
        with torch.no_grad():
            out = self.tap(torch.zeros(1, 3, size, size, device=self.device))
        logits = out.logits.shape[1] if self.teacher.meta.num_classes else 0
        return logits, out.embedding.flatten(1).shape[1]

    def compute_shard(self, path: Path, paths: list[str], views: np.ndarray, logits_width: int, width: int) -> int:
        """Write the shard of ``paths`` (each in its row of ``views``) atomically; unreadable tiles' rows are NaN.
        Returns the number of unreadable tiles."""
        reader = DataLoader(_TileReader(paths, self.prep.image_size, self.prep.stain), batch_size=self.batch_size,
                            num_workers=self.workers)
        unreadable = 0
        with atomic_path(path) as tmp:
            out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), views.shape[1], logits_width + width))
            for tiles, rows, readable in reader:
                rows = rows.numpy()
                for slot in range(views.shape[1]):
                    images = self.normalize(_in_views(tiles, views[rows, slot])).to(self.device)
                    result = _forward_teacher(self.tap, images)
                    self.forwards += 1
                    block = result.embedding.flatten(1).float()
                    if logits_width:
                        block = torch.cat([result.logits.float(), block], dim=1)
                    block[~readable.to(block.device)] = float("nan")
                    out[rows, slot] = block.cpu().numpy()
                unreadable += int((~readable).sum())
            out.flush()
            del out
        return unreadable


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def write_cache(folder: str | Path, teacher: Teacher, paths, prep: Preprocessing, device: torch.device,
                batch_size: int = 64, workers: int = 0, shard_tiles: int = DEFAULT_SHARD_TILES,
                progress: bool = False) -> dict:
    """Make (or complete) the cache of ``teacher`` over ``paths`` in ``folder``. A folder that already
    holds a cache of the same fingerprint and tiles is completed (finished shards are kept); one of
    another is refused. Returns a summary: tiles, views, shards computed and kept, forwards, seconds."""
    folder = Path(folder)
    keys = tile_keys(paths)
    if keys.empty:
        raise DataError("no tiles to compute teacher outputs for")
    wanted = fingerprint(teacher, prep)
    writer = CacheWriter(folder, teacher, prep, device, batch_size, workers, progress)
    index = _existing_index(folder)
    if index is None:
        index = _start_cache(folder, writer, wanted, keys, shard_tiles)
    else:
        _check_same_cache(folder, index, wanted, keys)
    return _fill_shards(folder, writer, index, keys)


def embed(folder: str | Path, teacher: Teacher, paths, prep: Preprocessing, device: torch.device,
          **options) -> dict:
    """:func:`write_cache` under the cache's lock (``moma embed``; runs with ``teacher_cache`` take the same lock)."""
    folder = Path(folder)
    with exclusive(folder / LOCK_NAME):
        return write_cache(folder, teacher, paths, prep, device, **options)


def _existing_index(folder: Path) -> dict | None:
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


def _start_cache(folder: Path, writer: CacheWriter, wanted: dict, keys: pd.DataFrame, shard_tiles: int) -> dict:
    """The tile table, the view table and the index (last: its presence means the plan is fixed)."""
    folder.mkdir(parents=True, exist_ok=True)
    logits_width, width = writer.widths()
    atomic_write_text(folder / TILES_NAME, keys.to_csv(index=False))
    with atomic_path(folder / VIEWS_NAME) as tmp, open(tmp, "wb") as handle:
        np.save(handle, _view_table(len(keys), writer.prep), allow_pickle=False)
    index = {"fingerprint": wanted, "tiles": len(keys), "tiles_digest": tiles_digest(keys),
             "views_per_tile": writer.prep.stored_per_tile, "logits_width": logits_width, "embedding_width": width,
             "shard_tiles": shard_tiles, "shards": -(-len(keys) // shard_tiles)}
    atomic_write_json(folder / INDEX_NAME, index)
    return index


def _check_same_cache(folder: Path, index: dict, wanted: dict, keys: pd.DataFrame) -> None:
    changed = differences(index["fingerprint"], wanted)
    if index.get("tiles_digest") != tiles_digest(keys):
        changed.append(f"tiles ({index['tiles']} in the cache, {len(keys)} asked for, or files changed since)")
    if changed:
        raise ConfigError(f"teacher cache {folder} was made with other {', '.join(changed)}; "
                          "write this cache to a new folder (--out) or delete the old one")


def _fill_shards(folder: Path, writer: CacheWriter, index: dict, keys: pd.DataFrame) -> dict:
    views = np.load(folder / VIEWS_NAME, allow_pickle=False)
    paths = keys["path"].tolist()
    size, start = index["shard_tiles"], time.perf_counter()
    missing = [n for n in range(index["shards"]) if not (folder / shard_name(n)).is_file()]
    unreadable = 0
    for number in tqdm(missing, desc="teacher cache shards", disable=not writer.progress, leave=False):
        rows = slice(number * size, min((number + 1) * size, len(paths)))
        unreadable += writer.compute_shard(folder / shard_name(number), paths[rows], views[rows],
                                           index["logits_width"], index["embedding_width"])
    if unreadable:
        log.warning("teacher cache %s: %d unreadable tile(s) have no outputs; a run that draws one stops (--skip-bad "
                    "leaves them out)", folder, unreadable)
    return {"folder": str(folder), "tiles": index["tiles"], "views_per_tile": index["views_per_tile"],
            "logits_width": index["logits_width"], "embedding_width": index["embedding_width"],
            "shards_computed": len(missing), "shards_kept": index["shards"] - len(missing),
            "forwards": writer.forwards, "seconds": time.perf_counter() - start, "unreadable": unreadable}


# ----------------------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache folder, read through memory maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = _existing_index(self.folder)
        if index is None:
            raise ConfigError(f"teacher cache {self.folder}: no {INDEX_NAME}; make it with `moma embed`")
        self.index = index
        missing = [n for n in range(index["shards"]) if not (self.folder / shard_name(n)).is_file()]
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


# ----------------------------------------------------------------------------- a run's cache


@dataclass
class RunTeacherCache:
    """A cache bound to one run: batch index (training rows, then the pool's) -> cache row."""

    cache: TeacherCache
    rows: np.ndarray

    def outputs(self, index: torch.Tensor, view: torch.Tensor | None, device: torch.device) -> TapOutputs:
        if view is None:
            raise DataError("the teacher cache needs each sample's view, but the training transform drew none")
        return self.cache.outputs(self.rows[index.numpy()], view.numpy().astype(np.int64), device)


def why_not_cached(method: DistillMethod) -> str:
    """Why a method runs its live teacher, in words (for the one log line)."""
    if method.updates_teacher:
        return "it updates its teacher's weights (a momentum teacher)"
    if method.teacher_stages:
        return "it reads the teacher's intermediate feature maps"
    if method.needs_teacher_feature_map:
        return "it reads the teacher's final feature map"
    return "it runs its own teacher pass"


def usable_for_run(cfg: Config, method: DistillMethod, train_transform) -> bool:
    """Whether a run with ``distill.teacher_cache`` set can read the teacher from a cache; if not, says why once."""
    setting = cfg.distill.teacher_cache
    if not method.requires_teacher:
        log.info("distill.teacher_cache=%s: method '%s' uses no teacher; nothing to cache", setting, method.name)
        return False
    if not method.uses_cached_teacher_outputs:
        log.info("distill.teacher_cache=%s: method '%s' runs the live teacher: %s", setting, method.name,
                 why_not_cached(method))
        return False
    if not getattr(train_transform, "teacher_view_is_pure", False):
        log.info("distill.teacher_cache=%s: the teacher sees the student's augmented view (RandAugment or stain "
                 "jitter with data.strong_augment=false), which no cache holds; the live teacher runs "
                 "(data.strong_augment=true gives the teacher a pure view)", setting)
        return False
    return True


def cache_folder(cfg: Config, teacher: Teacher, wanted: dict, keys: pd.DataFrame) -> Path:
    """The folder of this run's cache: the one named, or for ``auto`` one per teacher, preprocessing
    and tile set under ``distill.teacher_cache_dir`` (default: teacher_cache/ beside run.output_dir)."""
    if cfg.distill.teacher_cache != "auto":
        return Path(cfg.distill.teacher_cache)
    parent = Path(cfg.distill.teacher_cache_dir) if cfg.distill.teacher_cache_dir else \
        Path(cfg.run.output_dir).resolve().parent / DEFAULT_DIR
    return parent / default_name(teacher, wanted, keys)


def run_preprocessing(cfg: Config, data: DataBundle) -> Preprocessing:
    return Preprocessing(cfg.data.image_size, data.stain, training_views(cfg.augment))


def open_for_run(cfg: Config, data: DataBundle, teacher: Teacher, method: DistillMethod,
                 device: torch.device) -> RunTeacherCache | None:
    """The teacher cache of this run, found or made (under a file lock: grid shards share it), its
    tiles and views checked against the run; None when the live teacher runs (said once)."""
    if cfg.distill.teacher_cache == "off" or not usable_for_run(cfg, method, data.train.transform):
        return None
    prep = run_preprocessing(cfg, data)
    paths = data.table.frame["path"].tolist() + ([] if data.unlabelled is None else list(data.unlabelled.paths))
    keys = tile_keys(paths)
    wanted = fingerprint(teacher, prep)
    folder = cache_folder(cfg, teacher, wanted, keys)
    with exclusive(folder / LOCK_NAME):
        if not _complete(folder, wanted):
            log.info("teacher cache %s: computing the teacher's outputs for %d tiles x %d views", folder, len(keys),
                     prep.stored_per_tile)
            write_cache(folder, teacher, keys["path"], prep, device, batch_size=max(64, cfg.optim.batch_size))
    cache = TeacherCache(folder)
    _check_fingerprint(cache, wanted)
    run = RunTeacherCache(cache, np.concatenate([cache.rows(data.train.paths), _pool_rows(cache, data)]))
    _restrict_views(cache, data, run.rows, prep.views)
    log.info("teacher cache %s: the teacher's outputs are read from it (%d tiles x %d views); the teacher does "
             "not run during training", folder, cache.index["tiles"], cache.index["views_per_tile"])
    return run


def _complete(folder: Path, wanted: dict) -> bool:
    """Whether ``folder`` holds a finished cache (one of another fingerprint counts as finished: it is refused on use)."""
    index = _existing_index(folder) if folder.exists() else None
    if index is None:
        return False
    if index["fingerprint"] != wanted:
        return True
    return all((folder / shard_name(n)).is_file() for n in range(index["shards"]))


def _pool_rows(cache: TeacherCache, data: DataBundle) -> np.ndarray:
    return np.zeros(0, dtype=np.int64) if data.unlabelled is None else cache.rows(data.unlabelled.paths)


def _check_fingerprint(cache: TeacherCache, wanted: dict) -> None:
    """Refuse a cache made otherwise; views may differ where the cache holds every view the run draws."""
    stored = cache.fingerprint
    changed = [d for d in differences(stored, wanted) if not d.startswith("view")]
    every_view = stored["views_per_tile"] == len(stored["views"])
    if every_view and not set(wanted["views"]) <= set(stored["views"]):
        changed.append(f"views {stored['views']} (this run draws {wanted['views']})")
    if not every_view and stored["views"] != wanted["views"]:
        changed.append(f"views (a subset of {stored['views_per_tile']} of {stored['views']} per tile; this run draws "
                       f"from {wanted['views']})")
    if changed:
        raise ConfigError(f"teacher cache {cache.folder} was made with other {'; '.join(changed)}; set "
                          "distill.teacher_cache=auto or another folder, or delete this one")


def _restrict_views(cache: TeacherCache, data: DataBundle, rows: np.ndarray, views: tuple[int, ...]) -> None:
    """A cache of N views per tile: each tile's training view is drawn from its N."""
    if cache.index["views_per_tile"] == len(cache.fingerprint["views"]):
        return
    num_train = len(data.train)
    data.train.view_choices = cache.views[rows[:num_train]]
    if data.unlabelled is not None:
        data.unlabelled.view_choices = cache.views[rows[num_train:]]


# ----------------------------------------------------------------------------- moma embed


def parse_views(text: str) -> int | None:
    """``--views``: ``all`` (None) or a number of views per tile, 1 to 8."""
    if text.strip().lower() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= NUM_VIEWS:
        raise ConfigError(f"--views {text}: give all or a number of views per tile from 1 to {NUM_VIEWS}")
    return None if count == NUM_VIEWS else count


def embed_sources(teacher_path: str, sources: list[str], out: str | None = None, image_size: int | None = None,
                  views: str = "all", view_seed: int = 0, stain_method: str = "macenko",
                  stain_reference: str | None = None, device: str = "auto", **options) -> dict:
    """``moma embed``: the teacher cache of every tile of ``sources`` (tile folders, manifests,
    `moma tile` output), in ``out`` (default: teacher_cache/<teacher arch>-<fingerprint>)."""
    from moma.data.stain_norm import fit_reference
    from moma.data.unlabelled import source_paths
    from moma.engine.builder import load_teacher
    from moma.engine.device import resolve_device

    per_tile = parse_views(views)
    for source in sources:
        if not Path(source).exists():
            raise DataError(f"data {source} not found (a folder of tiles, a manifest CSV or `moma tile` output)")
    teacher = load_teacher(teacher_path)
    paths = [path for source in sources for path in source_paths(source)]
    if not paths:
        raise DataError(f"no image tiles found in {', '.join(sources)}")
    stain = fit_reference(stain_method, stain_reference) if stain_reference else None
    prep = Preprocessing(image_size or teacher.meta.image_size, stain, ALL_VIEWS, per_tile, view_seed)
    folder = Path(out) if out else Path(DEFAULT_DIR) / default_name(teacher, fingerprint(teacher, prep), tile_keys(paths))
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the teacher cache")
    return embed(folder, teacher, paths, prep, resolve_device(device), **options)
