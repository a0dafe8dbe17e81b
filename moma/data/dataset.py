"""PyTorch dataset of tiles, resized to the configured size and decoded once where ``data.cache``
lets it: kept in memory, read from a tile store on disk (:mod:`moma.data.tile_store`), or decoded
on every read."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from moma.data.tiles import TileTable, load_rgb
from moma.data.transforms import NO_VIEW, transform_with_view
from moma.errors import DataError

if TYPE_CHECKING:
    from moma.data.tile_store import TileStore

log = logging.getLogger(__name__)


# A tile further than this factor from the configured size is probably at another resolution
# than the model expects (or data.image_size is wrong): resizing hides that, so it is said.
SIZE_WARN_RATIO = 2.0
# data.cache=auto keeps decoded tiles in memory while they take at most this share of the machine's
# memory, else in a tile store on disk while it fits its disk budget (moma.data.tile_store.disk_budget).
CACHE_MEMORY_SHARE = 0.25
Storage = Literal["memory", "disk", "off"]
_size_warned: set[int] = set()


def reset_size_warning() -> None:
    """Let the next far-off tile size be reported again (one warning per run, not per tile)."""
    _size_warned.clear()


def _warn_far_size(path: str, found: tuple[int, int], size: int) -> None:
    if size in _size_warned or max(max(found) / size, size / max(1, min(found))) <= SIZE_WARN_RATIO:
        return
    _size_warned.add(size)
    log.warning("tile %s is %dx%d px, more than %gx from the %d px the model takes (data.image_size): tiles are "
                "resized to %dx%d; check the tiles' resolution or data.image_size (said once)",
                path, found[0], found[1], SIZE_WARN_RATIO, size, size, size)


def decode_tile(path: str, size: int) -> torch.Tensor:
    """A tile as a uint8 CHW tensor of ``size`` x ``size`` pixels."""
    image = load_rgb(path)
    if image.size != (size, size):
        _warn_far_size(path, image.size, size)
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def choose_storage(setting: Storage | Literal["auto"], num_tiles: int, image_size: int, memory_budget: int | None,
                   disk_budget: int | None, store_tiles: int | None = None) -> Storage:
    """Where decoded tiles are kept: ``setting`` unless it is ``auto``; for ``auto``, in memory when
    the ``num_tiles`` the run reads fit ``memory_budget`` bytes decoded, else in a tile store on disk
    when the ``store_tiles`` it would hold (the whole source; default ``num_tiles``) fit
    ``disk_budget``, else nowhere (decoded on every read). An unknown budget does not fit."""
    if setting != "auto":
        return setting
    needed = num_tiles * 3 * image_size * image_size
    on_disk = (num_tiles if store_tiles is None else store_tiles) * 3 * image_size * image_size
    storage: Storage = "memory" if _fits(needed, memory_budget) else "disk" if _fits(on_disk, disk_budget) else "off"
    log.info("data.cache=auto: %d tiles of %d px decode to %.2f GiB; memory budget %s, disk budget %s: %s", num_tiles,
             image_size, needed / 2**30, _gib(memory_budget), _gib(disk_budget), {
                 "memory": "kept in memory", "disk": "kept in a tile store on disk (data.tile_store_dir)",
                 "off": "decoded on every read (set data.cache=memory or disk to force)"}[storage])
    return storage


def _fits(needed: int, budget: int | None) -> bool:
    return budget is not None and needed <= budget


def _gib(budget: int | None) -> str:
    return "unknown" if budget is None else f"{budget / 2**30:.2f} GiB"


def cache_budget() -> int | None:
    total = memory_bytes()
    return None if total is None else int(total * CACHE_MEMORY_SHARE)


class TileDataset(Dataset):
    """Yields ``(image, target, index)``; ``index`` is the row in this dataset (CRD's memory bank
    and other per-sample state key on it)."""

    def __init__(
        self,
        table: TileTable,
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = True,
        skip_bad: bool = False,
        progress: bool = False,
        description: str = "tiles",
        store: TileStore | None = None,
    ):
        """``cache``: keep the decoded tiles in memory; ``store``: read them from a tile store that
        holds every tile of ``table`` instead (``cache`` is then ignored); neither: decode on every read."""
        self.image_size = image_size
        self.transform = transform
        self.skipped: list[str] = []
        paths = table.frame["path"].tolist()
        cache = cache and store is None
        if store is not None:
            store_rows, images = store.rows_of(paths), []
            keep = self._readable_in_store(store, store_rows, paths, skip_bad)
        elif cache or skip_bad:
            keep, images, store_rows = *self._decode_all(paths, cache, skip_bad, progress, description), None
        else:
            keep, images, store_rows = np.ones(len(paths), dtype=bool), [], None
        if self.skipped:
            log.warning("skipped %d unreadable tile(s) in %s, e.g. %s", len(self.skipped), description, self.skipped[0])
        self.table = table.subset(keep) if self.skipped else table
        if len(self.table) == 0:
            raise DataError(f"{description}: no readable tiles left")
        self.paths = self.table.frame["path"].tolist()
        self.targets = torch.as_tensor(self.table.frame["target"].to_numpy().copy(), dtype=torch.long)
        # One tensor: forked loader workers share its memory pages (nothing is copied), and spawned
        # workers receive it through shared memory (torch moves its storage there when pickled).
        self.images = torch.stack(images) if cache else None
        self.store = store
        self.store_rows = None if store_rows is None else store_rows[keep]
        # Per row, the views a training transform may draw (a teacher cache holding a fixed subset of
        # each tile's views); None: any view of the configured flips and rotations.
        self.view_choices: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def cached(self) -> bool:
        """Whether tiles are read decoded (from memory or a tile store), not decoded on each read."""
        return self.images is not None or self.store is not None

    def __len__(self) -> int:
        return len(self.paths)

    def _decode_all(self, paths: list[str], cache: bool, skip_bad: bool, progress: bool,
                    description: str) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Decode every tile once: the rows to keep (readable) and, with ``cache``, their tiles."""
        keep = np.ones(len(paths), dtype=bool)
        images: list[torch.Tensor] = []
        for row, path in enumerate(tqdm(paths, desc=f"reading {description}", disable=not progress, leave=False)):
            try:
                tile = decode_tile(path, self.image_size)
            except DataError:
                if not skip_bad:
                    raise
                keep[row] = False
                self.skipped.append(path)
                continue
            if cache:
                images.append(tile)
        return keep, images

    def _readable_in_store(self, store: TileStore, rows: np.ndarray, paths: list[str], skip_bad: bool) -> np.ndarray:
        """The rows to keep (``rows``: each path's row in the store): those the store could read; an
        unreadable tile stops here without skip_bad."""
        if (rows < 0).any():
            missing = paths[int(np.flatnonzero(rows < 0)[0])]
            raise DataError(f"tile {missing} is not in the tile store {store.folder}; its data source changed "
                            "since the store was opened: run again")
        bad = np.isin(rows, np.fromiter(store.bad, dtype=np.int64, count=len(store.bad)))
        if bad.any() and not skip_bad:
            raise DataError(store.bad[int(rows[bad][0])])
        self.skipped += [paths[i] for i in np.flatnonzero(bad)]
        return ~bad

    def raw_image(self, index: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[index]
        if self.store is not None:
            return self.store.read(int(self.store_rows[index]))
        return decode_tile(self.paths[index], self.image_size)

    def __getitem__(self, item: int | tuple[int, int]):
        """``item`` is a row, or ``(row, seed)``: the augmentation then draws from torch's generator
        seeded with ``seed`` (the caller's generator state is restored afterwards), so a sample's
        augmentation does not depend on which loader worker produced it. A training transform (one
        that draws a flip/rotation view) adds the view number: ``(image, target, index, view)``."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, view = self.raw_image(index), NO_VIEW
        if self.transform is not None:
            choices = None if self.view_choices is None else self.view_choices[index]
            image, view = transform_with_view(self.transform, image, choices, seed)
        sample = (image, self.targets[index], index)
        return sample if view == NO_VIEW else (*sample, view)
