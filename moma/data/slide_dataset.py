"""The tiles of one slide as a dataset of whole batches, so reading, decoding and preprocessing run
in loader workers while the model runs on the previous batch.

Item ``i`` is batch ``i``: consecutive tiles of the plan (row by row, so a batch covers a strip of
the slide and its reads share the reader's decoded file tiles). Each worker process opens its own
slide handle on first use: readers hold file handles and caches that processes must not share.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moma.data.slides import Slide, SlideReader
from moma.errors import DataError

Transform = Callable[[torch.Tensor], torch.Tensor]


class SlideTileBatches(Dataset):
    """Yields ``(images, index, failures)``: the readable tiles of the batch through ``transform``
    (one by one, as training saw them), their positions in the plan, and ``(position, message)``
    for each tile the reader could not read. A damaged region thus costs its tiles, not the slide,
    and the caller reports it in one line instead of receiving a worker's traceback."""

    def __init__(self, slide: str | Path, slide_mpp: float, boxes: np.ndarray, tile_size: int, batch_size: int,
                 transform: Transform | None = None, reader: type[SlideReader] | None = None):
        self.slide_path = Path(slide)
        self.slide_mpp = slide_mpp
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)  # x, y, size, level (level-0 pixels)
        self.tile_size = tile_size
        self.batch_size = max(1, int(batch_size))
        self.transform = transform
        self.reader = reader
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return -(-len(self.boxes) // self.batch_size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}

    def __getitem__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        if self._slide is None:
            self._slide = Slide(self.slide_path, self.slide_mpp, self.reader)
        start = batch * self.batch_size
        images, index, failures = [], [], []
        for position, (x, y, size, level) in enumerate(self.boxes[start:start + self.batch_size].tolist(), start):
            try:
                pixels = self._slide.read_rgb(x, y, size, level, self.tile_size)
            except DataError as exc:
                failures.append((position, str(exc)))
                continue
            images.append(self._prepare(pixels))
            index.append(position)
        stacked = torch.stack(images) if images else torch.empty(0)
        return stacked, torch.tensor(index, dtype=torch.int64), failures

    def _prepare(self, pixels: np.ndarray) -> torch.Tensor:
        writable = pixels if pixels.flags.writeable else pixels.copy()  # torch warns on read-only arrays
        image = torch.from_numpy(writable).permute(2, 0, 1).contiguous()
        return self.transform(image) if self.transform is not None else image

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
