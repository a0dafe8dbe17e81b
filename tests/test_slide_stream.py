"""Streaming a slide's tiles through the model: reader processes, batches in plan order, the model's
threads left to it, and the preprocessing split between readers and device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import moma.engine.slide_stream as stream
from moma.config import AugmentConfig
from moma.data.slide_dataset import SlideTileBatches
from moma.data.transforms import build_eval_transform
from slide_helpers import CELL, cells, make_slide

CUDA = torch.device("cuda")  # only its type is read: no GPU needed
CPU = torch.device("cpu")


class Darken(torch.nn.Module):
    """A uint8 -> uint8 step standing in for stain normalisation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image // 2


def test_on_a_gpu_the_float_steps_run_on_the_batch_and_give_the_same_input():
    aug = AugmentConfig()
    plain = build_eval_transform(aug)
    assert stream.split_for_device(plain, CPU) == (plain, None)
    per_tile, per_batch = stream.split_for_device(plain, CUDA)
    assert per_tile is None and [type(t) for t in per_batch.transforms] == [v2.ToDtype, v2.Normalize]

    full = v2.Compose([Darken(), *plain.transforms])
    per_tile, per_batch = stream.split_for_device(full, CUDA)
    tiles = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(3)]
    split = per_batch(torch.stack([per_tile(t) for t in tiles]))
    assert split.dtype == torch.float32
    torch.testing.assert_close(split, torch.stack([full(t) for t in tiles]))
    odd = v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    assert stream.split_for_device(odd, CUDA) == (odd, None)  # not the shape it knows: all per tile


def test_workers_by_default_and_the_models_threads(monkeypatch):
    monkeypatch.setattr(stream, "cpu_cores", lambda: 16)
    assert (stream.auto_workers(CPU), stream.auto_workers(CUDA)) == (4, 8)
    monkeypatch.setattr(stream, "cpu_cores", lambda: 2)
    assert (stream.auto_workers(CPU), stream.auto_workers(CUDA)) == (1, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with stream.model_threads(1, CPU) as threads:
            assert threads == torch.get_num_threads() == 1  # the reader keeps the other core
        assert torch.get_num_threads() == 2
        with stream.model_threads(0, CPU) as threads:
            assert threads == 2
    finally:
        torch.set_num_threads(before)


class MeanColour(torch.nn.Module):
    """A 'model' whose logits are a tile's mean colour: probabilities tell the tiles apart."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_come_back_in_plan_order(tmp_path, workers):
    slide = make_slide(tmp_path / "s.tif")
    boxes = np.array([(c * CELL, r * CELL, CELL, 1) for r, c in cells()], dtype=np.int64)
    dataset = SlideTileBatches(slide, 0.25, boxes, 32, batch_size=5)
    assert len(dataset) == -(-len(boxes) // 5)
    result = stream.stream_probs(MeanColour(), dataset, 3, CPU, workers)
    one_by_one = SlideTileBatches(slide, 0.25, boxes, 32, batch_size=1)
    expected = np.concatenate([torch.softmax(MeanColour()(one_by_one[i][0]), 1).numpy() for i in range(len(boxes))])
    np.testing.assert_allclose(result.probs, expected, atol=1e-6)
    assert result.ok.all() and not result.failures and 0 <= result.data_wait <= 1 and result.seconds > 0
