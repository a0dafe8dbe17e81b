"""Paths that only exist on a CUDA device: bf16/fp16 autocast, channels_last, torch.compile, and
MoMA's step there. Not collected by the default test command (``-m 'not cuda'`` in pyproject's
addopts: CI has no GPU); ``benchmarks/gpu_check.sh`` runs them on a GPU with ``-m cuda`` and
MOMA_REQUIRE_CUDA=1, so there they cannot be skipped."""

from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import make_tile_folder, tiny_config, write_teacher
from moma.engine.checkpoint import load_model_checkpoint
from moma.engine.runs import run_training
from moma.engine.trainer import Trainer

# MOMA_REQUIRE_CUDA=1 (set by gpu_check.sh) turns the skip into a failure: on the GPU machine a
# missing device must not pass as "skipped".
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("MOMA_REQUIRE_CUDA"),
                                                   reason="needs a CUDA device")]


@pytest.fixture
def tiles(tmp_path):
    return make_tile_folder(tmp_path / "tiles", per_class=16)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_train_on_cuda(tmp_path, tiles, amp):
    cfg = tiny_config(tmp_path, tiles, run={"device": "cuda"}, train={"amp": amp, "channels_last": True,
                                                                      "progress": False, "tensorboard": False},
                      optim={"epochs": 3, "lr": 0.05})
    results = run_training(cfg)
    assert math.isfinite(results.test_metrics("best")["accuracy"]) and results.test_metrics("best")["accuracy"] >= 0.9
    assert results.peak_memory_mb > 0
    state, meta = load_model_checkpoint(f"{results.run_dir}/best.safetensors")
    assert all(t.device.type == "cpu" for t in state.values()) and meta.arch == "test_resnet"


def test_trainer_puts_the_model_in_channels_last_and_autocasts(tmp_path, tiles):
    cfg = tiny_config(tmp_path, tiles, run={"device": "cuda"}, train={"amp": "auto", "channels_last": "auto"})
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.device.type == "cuda" and trainer.channels_last and trainer.amp_dtype == torch.bfloat16
    conv = next(m for m in trainer.task.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_torch_compile_trains_and_saves_plain_keys(tmp_path, tiles):
    # 64 px, not the suite's 32: at 32 px the last stage's maps are 1x1, where channels_last and
    # contiguous strides coincide, and torch 2.11's inductor then asserted a wrong stride for a
    # convolution_backward weight gradient (seen on an H200, 2026-12-04). 2x2 maps keep them apart.
    cfg = tiny_config(tmp_path, tiles, run={"device": "cuda"}, data={"image_size": 64},
                      train={"compile": True, "channels_last": True, "progress": False, "tensorboard": False},
                      optim={"epochs": 2})
    results = run_training(cfg)
    state, _ = load_model_checkpoint(f"{results.run_dir}/best.safetensors")
    assert not any("_orig_mod" in key for key in state)
    assert math.isfinite(results.test_metrics("last")["macro_f1"])


def test_moma_step_on_cuda_with_bf16(tmp_path, tiles):
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["tumour", "stroma", "immune"])
    cfg = tiny_config(tmp_path, tiles, run={"device": "cuda"}, train={"amp": "bf16", "progress": False,
                                                                      "tensorboard": False},
                      distill={"method": "moma", "teacher": str(teacher), "params": {"queue_size": 32}},
                      optim={"epochs": 2})
    results = run_training(cfg)
    assert math.isfinite(results.test_metrics("best")["accuracy"])
