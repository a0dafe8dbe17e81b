"""A slide's tiles through a model at the model's speed: loader workers (each with its own slide
handle) read, decode and preprocess whole batches while the model runs on the batch before; the
main process only feeds the model. The time the model waits for a batch is measured, so a slow
reader shows up as ``data_wait`` rather than as a slow model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from moma.data.slide_dataset import SlideTileBatches

PREFETCH_BATCHES = 2  # per worker: enough to hide a slow batch, few enough to keep memory flat
MAX_AUTO_WORKERS = 8


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(device: torch.device) -> int:
    """Reader processes when none are asked for, at least one so that reading overlaps the model.
    A GPU leaves the cores to reading (all but the one feeding it, at most eight); on the CPU the
    model needs them, and a quarter of them keep it fed (reading and preprocessing a tile costs a
    few per cent of a convolutional network's forward pass)."""
    cores = cpu_cores()
    if device.type == "cuda":
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    return max(1, cores // 4)


@contextmanager
def model_threads(workers: int, device: torch.device) -> Iterator[int]:
    """Leave the readers their cores: on the CPU the model's intra-op threads are capped at the
    cores the workers do not take, since OpenMP threads that lose their core to a reader stall
    every other thread at the next barrier. Yields the thread count; restored on exit."""
    before = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(before, cpu_cores() - workers)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@dataclass
class StreamResult:
    """Class probabilities of every tile of the plan (NaN rows for unreadable tiles), the reader's
    message for each unreadable tile, and where the time went."""

    probs: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.probs).any(axis=1) if len(self.probs) else np.zeros(0, dtype=bool)

    @property
    def data_wait(self) -> float:
        """Share of the time the model sat waiting for a batch."""
        return self.wait_seconds / self.seconds if self.seconds > 0 else 0.0


def _loader(dataset: SlideTileBatches, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH_BATCHES if workers > 0 else None, persistent_workers=False)


def split_for_device(transform: nn.Module | None, device: torch.device) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's preprocessing as (per tile, in the readers; per batch, on the device). On a GPU
    its closing float conversion and normalisation run on the batch there, so tiles travel as
    uint8: a quarter of the bytes through shared memory, pinning and the bus. On the CPU, and for
    a transform of any other shape, all of it runs per tile in the readers."""
    if device.type != "cuda" or not isinstance(transform, v2.Compose):
        return transform, None
    steps = list(transform.transforms)
    if len(steps) < 2 or not (isinstance(steps[-2], v2.ToDtype) and isinstance(steps[-1], v2.Normalize)):
        return transform, None
    head = steps[:-2]
    return (v2.Compose(head) if head else None), v2.Compose(steps[-2:])


@torch.no_grad()
def stream_probs(model: nn.Module, dataset: SlideTileBatches, num_classes: int, device: torch.device, workers: int,
                 progress: bool = False, desc: str = "tiles", batch_transform: nn.Module | None = None) -> StreamResult:
    """Softmax probabilities of every tile of ``dataset`` in plan order; ``batch_transform`` runs on
    each batch on the device (see ``split_for_device``)."""
    result = StreamResult(np.full((len(dataset.boxes), num_classes), np.nan, dtype=np.float32))
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept on the device: no sync per batch
    start = time.perf_counter()
    batches = iter(_loader(dataset, workers, device))
    with tqdm(total=len(dataset.boxes), desc=desc, unit="tile", disable=not progress, leave=False) as bar:
        while True:
            asked = time.perf_counter()
            item = next(batches, None)
            result.wait_seconds += time.perf_counter() - asked
            if item is None:
                break
            images, index, failures = item
            result.failures.update(failures)
            if len(index):
                images = images.to(device, non_blocking=True)
                logits = model(batch_transform(images) if batch_transform is not None else images)
                outputs.append((index, F.softmax(logits.float(), dim=1)))
            bar.update(len(index) + len(failures))
    for index, probs in outputs:
        result.probs[index.numpy()] = probs.cpu().numpy()
    dataset.close()
    result.seconds = time.perf_counter() - start
    return result
