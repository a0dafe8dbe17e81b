"""PyTorch dataset of tiles: decoded once (optionally cached), resized to the configured size."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from moma.data.tiles import TileTable, load_rgb
from moma.errors import DataError

log = logging.getLogger(__name__)


def decode_tile(path: str, size: int) -> torch.Tensor:
    """A tile as a uint8 CHW tensor of ``size`` x ``size`` pixels."""
    image = load_rgb(path)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


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
