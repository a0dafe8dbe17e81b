"""Writing a teacher cache (``moma embed``): the frozen teacher run once over every tile and view.

The outputs go into shards that are each written atomically, so an interrupted ``moma embed``
computes only the missing ones when it is run again; the folder's format is described in
:mod:`moma.engine.teacher_cache`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moma.config import AugmentConfig
from moma.data.dataset import decode_tile
from moma.data.stain_norm import StainNormalizer, StainReference
from moma.data.transforms import normalize_transform
from moma.data.views import NUM_VIEWS, apply_view
from moma.engine.builder import Teacher
from moma.engine.teacher_cache import (ALL_VIEWS, DEFAULT_DIR, INDEX_NAME, LOCK_NAME, TILES_NAME, VIEWS_NAME,
                                       Preprocessing, default_name, differences, fingerprint, missing_shards,
                                       read_index, shard_name, tile_keys, tiles_digest)
from moma.errors import ConfigError, DataError
from moma.models.taps import FeatureTap, TapOutputs
from moma.utils.io import atomic_path, atomic_write_json, atomic_write_text
from moma.utils.locks import exclusive

log = logging.getLogger(__name__)

DEFAULT_SHARD_TILES = 1024


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



def write_cache(folder: str | Path, teacher: Teacher, keys: pd.DataFrame, wanted: dict, prep: Preprocessing,
                device: torch.device, batch_size: int = 64, workers: int = 0,
                shard_tiles: int = DEFAULT_SHARD_TILES, progress: bool = False) -> dict:
    """Make (or complete) the cache of ``teacher`` over the tiles ``keys`` (:func:`tile_keys`) in
    ``folder``, whose fingerprint is ``wanted`` (:func:`fingerprint`; the caller computes both once,
    the fingerprint hashes every teacher tensor). A folder that already holds a cache of the same
    fingerprint and tiles is completed (finished shards are kept); one of another is refused.
    Returns a summary: tiles, views, shards computed and kept, forwards, seconds."""
    folder = Path(folder)
    writer = CacheWriter(folder, teacher, prep, device, batch_size, workers, progress)
    index = read_index(folder)
    if index is None:
        index = _start_cache(folder, writer, wanted, keys, shard_tiles)
    else:
        _check_same_cache(folder, index, wanted, keys)
    return _fill_shards(folder, writer, index, keys)



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
    missing = missing_shards(folder, index)
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
    keys, wanted = tile_keys(paths), fingerprint(teacher, prep)  # once: the fingerprint hashes every teacher tensor
    folder = Path(out) if out else Path(DEFAULT_DIR) / default_name(teacher, wanted, keys)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the teacher cache")
    with exclusive(folder / LOCK_NAME):  # runs with distill.teacher_cache take the same lock
        return write_cache(folder, teacher, keys, wanted, prep, resolve_device(device), **options)
