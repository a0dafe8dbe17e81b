"""A PyTorch dataset over the tiles of one slide, read on demand (each loader worker opens its own
handle: slide readers hold file handles that processes must not share)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moma.data.slides import Slide, SlideReader
from moma.errors import DataError


class SlideTileDataset(Dataset):
    """Yields ``(image, ok, index)``: ``ok`` is False (and the image blank) where the slide could
    not be read, so the caller can report the failure in one line rather than receive a loader
    worker's traceback."""

    def __init__(self, slide: str | Path, slide_mpp: float, x: np.ndarray, y: np.ndarray, size: np.ndarray,
                 level: np.ndarray, tile_size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reader: type[SlideReader] | None = None):
        self.slide_path = Path(slide)
        self.slide_mpp = slide_mpp
        self.boxes = np.stack([np.asarray(a, dtype=np.int64) for a in (x, y, size, level)], axis=1)
        self.tile_size = tile_size
        self.transform = transform
        self.reader = reader
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}

    def __getitem__(self, index: int):
        if self._slide is None:
            self._slide = Slide(self.slide_path, self.slide_mpp, self.reader)
        x, y, size, level = (int(v) for v in self.boxes[index])
        try:
            pixels = self._slide.read_rgb(x, y, size, level, self.tile_size)
            ok = True
        except DataError:
            pixels = np.full((self.tile_size, self.tile_size, 3), 255, dtype=np.uint8)
            ok = False
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, ok, index

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
