"""PyTorch dataset of tiles: decoded once (optionally cached), resized to the configured size."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from moma.data.tiles import TileTable, load_rgb
from moma.errors import DataError

log = logging.getLogger(__name__)


# A tile further than this factor from the configured size is probably at another resolution
# than the model expects (or data.image_size is wrong): resizing hides that, so it is said.
SIZE_WARN_RATIO = 2.0
# data.cache=auto caches decoded tiles while they take at most this share of the machine's memory.
CACHE_MEMORY_SHARE = 0.25
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


def choose_cache(setting: bool | Literal["auto"], num_tiles: int, image_size: int, budget: int | None) -> bool:
    """Whether to keep every decoded tile in memory: ``setting`` if it is a bool; for ``auto``, only
    when ``num_tiles`` decoded RGB tiles fit ``budget`` bytes (an unknown budget: no cache)."""
    if setting != "auto":
        return bool(setting)
    needed = num_tiles * 3 * image_size * image_size
    cache = budget is not None and needed <= budget
    log.info("data.cache=auto: %d tiles of %d px decode to %.2f GiB, %s the %s budget: %s", num_tiles, image_size,
             needed / 2**30, "within" if cache else "over", "unknown" if budget is None else f"{budget / 2**30:.2f} GiB",
             "cached in memory" if cache else "decoded on every read (set data.cache=true to force)")
    return cache


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
    ):
        self.image_size = image_size
        self.transform = transform
        self.skipped: list[str] = []
        frame = table.frame
        keep = np.ones(len(frame), dtype=bool)
        images: list[torch.Tensor] = []
        if cache or skip_bad:
            iterator = tqdm(frame["path"], desc=f"reading {description}", disable=not progress, leave=False)
            for row, path in enumerate(iterator):
                try:
                    tile = decode_tile(path, image_size)
                except DataError:
                    if not skip_bad:
                        raise
                    keep[row] = False
                    self.skipped.append(path)
                    continue
                if cache:
                    images.append(tile)
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

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.paths)

    def raw_image(self, index: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[index]
        return decode_tile(self.paths[index], self.image_size)

    def __getitem__(self, item: int | tuple[int, int]):
        """``item`` is a row, or ``(row, seed)``: the augmentation then draws from torch's generator
        seeded with ``seed`` (the caller's generator state is restored afterwards), so a sample's
        augmentation does not depend on which loader worker produced it."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.raw_image(index)
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.transform(image)
        return image, self.targets[index], index
