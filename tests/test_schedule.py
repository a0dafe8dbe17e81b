"""The learning-rate schedule, against values worked out by hand."""

import math

import pytest
import torch

from moma.config import OptimConfig
from moma.engine.schedule import build_scheduler, lr_factor


def test_warmup_then_cosine_to_min_lr():
    optim = OptimConfig(epochs=3, warmup_epochs=1, min_lr=0.01, scheduler="cosine")
    factors = [lr_factor(optim, step, steps_per_epoch=4, base_lr=0.1, total_steps=12) for step in range(12)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (step + 1) / 4
    # cosine over the 8 steps after warm-up from 1 to the floor min_lr / base_lr = 0.1
    assert factors[4] == pytest.approx(1.0)
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # 0.55
    assert factors[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_step_decay_and_a_scheduler_state_of_plain_numbers():
    optim = OptimConfig(epochs=5, scheduler="step", step_epochs=[2, 4])
    assert [lr_factor(optim, s, 3, 0.1, 15) for s in (0, 5, 6, 11, 12)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=3, total_steps=15)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # the multiplier is not saved: nothing to unpickle
