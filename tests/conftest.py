"""Shared fixtures: tiny synthetic tile sets (32 px) and tiny timm models, so tests run on CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moma.config import Config, build_config

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]

# Each class is a colour: the classes are separable, so learning is visible in a few steps.
CLASS_COLOURS = {"tumour": (200, 60, 90), "stroma": (230, 160, 190), "immune": (70, 60, 170), "fat": (240, 240, 235)}


def load_script(name: str, folder: str = "scripts"):
    """A script of scripts/ (or benchmarks/) imported as a module (neither is a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_teacher(path: Path, class_names, arch: str = "test_resnet", seed: int | None = 0,
                  mpp: float | None = None) -> Path:
    """A randomly initialised timm model saved as a teacher checkpoint (32 px, ImageNet normalisation,
    trained at ``mpp`` um/px when given); ``seed=None`` leaves the global RNG as it is."""
    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    if seed is not None:
        torch.manual_seed(seed)
    model = create_backbone(arch, len(class_names))
    meta = ModelMetadata(arch, list(class_names), 32, list(IMAGENET_MEAN), list(IMAGENET_STD), mpp=mpp)
    save_model_checkpoint(path, model.state_dict(), meta)
    return path


def write_tile(path: Path, colour, size: int = 32, seed: int = 0, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, dtype=float) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


LUNG = Path(__file__).resolve().parents[1] / "data" / "demo" / "lc25000_lung"


@pytest.fixture(scope="session")
def lung_subset(tmp_path_factory) -> Path:
    """A manifest of the first 96 shipped LC25000 lung tiles of each class (absolute paths): real H&E
    tiles for the tests whose diagnostics need real images."""
    import pandas as pd

    table = pd.read_csv(LUNG / "manifest.csv")
    subset = table.groupby("label", group_keys=False).head(96)[["path", "label"]]
    subset["path"] = [str(LUNG / p) for p in subset["path"]]
    path = tmp_path_factory.mktemp("lung") / "manifest.csv"
    subset.to_csv(path, index=False)
    return path


def make_tile_folder(root: Path, classes=("tumour", "stroma", "immune"), per_class: int = 24, size: int = 32,
                     patients_per_class: int = 4, manifest: bool = True) -> Path:
    """A class-per-folder tile set, plus a manifest.csv with a patient ``group`` column."""
    rows = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}/{name}_{i:03d}.png"
            write_tile(root / rel, CLASS_COLOURS[name], size=size, seed=1000 * c + i)
            rows.append({"path": rel, "label": name, "group": f"{name}_patient{i % patients_per_class}"})
    if manifest:
        with open(root / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "group"])
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture
def tile_folder(tmp_path) -> Path:
    return make_tile_folder(tmp_path / "tiles")


def tiny_config(tmp_path: Path, source: Path, **sections) -> Config:
    """A config that trains test_resnet on 32 px tiles in seconds."""
    tree = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"source": str(source), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "augment": {"randaugment": False},
        "model": {"arch": "test_resnet"},
        "optim": {"epochs": 2, "batch_size": 16, "lr": 0.05},
        "train": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return build_config(tree)


@pytest.fixture
def make_config(tmp_path):
    def factory(source: Path, **sections) -> Config:
        return tiny_config(tmp_path, source, **sections)

    return factory


def interrupt_run(cfg: Config, monkeypatch, epoch: int = 1, step: int = 1) -> None:
    """Train ``cfg`` and kill it (KeyboardInterrupt) just before step ``step`` of epoch ``epoch``
    (0-based; the default is the middle of the second epoch), leaving a run folder to resume."""
    import moma.engine.trainer as trainer_module
    from moma.engine.runs import run_training

    original_step = trainer_module.Trainer._step

    def interrupted_step(self, batch, at_epoch, at_step):
        if (at_epoch, at_step) == (epoch, step):
            raise KeyboardInterrupt
        return original_step(self, batch, at_epoch, at_step)

    monkeypatch.setattr(trainer_module.Trainer, "_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    monkeypatch.setattr(trainer_module.Trainer, "_step", original_step)


@pytest.fixture
def restore_logging():
    """The CLI's ``main`` installs its log handler on the root logger; later tests should not inherit it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
