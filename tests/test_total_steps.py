"""optim.total_steps: every run takes the same number of optimiser steps whatever the size of its
training set (learning curves compare students trained equally long)."""

from __future__ import annotations

import json

import pytest

from conftest import make_tile_folder, tiny_config
from moma.engine.runs import run_training
from moma.engine.trainer import Trainer
from moma.errors import ConfigError


@pytest.mark.parametrize("per_class", [2, 6])
def test_same_steps_and_schedule_for_any_subset_size(tmp_path, per_class):
    source = make_tile_folder(tmp_path / "d", per_class=16, patients_per_class=16)
    cfg = tiny_config(tmp_path, source, data={"train_per_class": per_class},
                      optim={"epochs": 2, "total_steps": 7, "batch_size": 4, "lr": 0.05, "min_lr": 0.001})
    results = run_training(cfg, run_dir=tmp_path / "run")
    assert results.optimizer_steps == 7  # 3 + 4: the steps spread over the 2 epochs
    assert results.data["train"] == 3 * per_class
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["classes"]) == 3
    # 6 tiles (2 batches of 4) need 2 passes per epoch; 18 tiles (5 batches) one
    trainer = Trainer(cfg, tmp_path / "probe")
    assert [trainer.loaders.round_steps(e) for e in range(2)] == [3, 4]
    assert trainer.total_steps == 7


def test_schedule_ends_at_min_lr_after_total_steps(tmp_path):
    source = make_tile_folder(tmp_path / "d", per_class=8, patients_per_class=8)
    cfg = tiny_config(tmp_path, source, optim={"epochs": 3, "total_steps": 9, "batch_size": 4, "lr": 0.1,
                                               "min_lr": 0.002})
    trainer = Trainer(cfg, tmp_path / "run")
    lrs = []
    for step in range(9):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's call order
        trainer.scheduler.step()
    assert lrs[0] == pytest.approx(0.1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.002)  # after exactly total_steps
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_total_steps_below_epochs_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="total_steps"):
        tiny_config(tmp_path, tmp_path, optim={"epochs": 5, "total_steps": 3})
