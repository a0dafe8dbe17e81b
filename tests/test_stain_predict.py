"""A model trained with stain normalisation carries it: the checkpoint and the ONNX export record the
fitted reference, and `moma predict` applies it to tiles and slides from PyTorch and ONNX Runtime
alike (same probabilities within 1e-5); without it the probabilities differ, so the check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from conftest import tiny_config, write_teacher
from moma.cli import main
from moma.config import AugmentConfig
from moma.data.dataset import decode_tile
from moma.data.transforms import build_eval_transform
from moma.engine.builder import check_resolution
from moma.engine.checkpoint import load_model_checkpoint, read_metadata, save_model_checkpoint
from moma.engine.export import export_onnx
from moma.engine.inference import eval_transform, predict_folder
from moma.engine.trainer import Trainer
from slide_helpers import cells, make_slide

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "lc25000_lung"
REFERENCE = DEMO / "lung_aca" / "lungaca1.png"
CLASSES = ["lung_aca", "lung_n", "lung_scc"]
PROBS = [f"prob_{name}" for name in CLASSES]

pytestmark = pytest.mark.usefixtures("restore_logging")  # main() installs the CLI's log handler


def train_normalised(tmp_path: Path, method: str) -> Path:
    """Two steps on the shipped tiles at 32 px and 0.5 um/px, stain-normalised to one of them."""
    cfg = tiny_config(tmp_path, DEMO, data={"image_size": 32, "mpp": 0.5,
                                            "stain_normalize": {"method": method, "reference": str(REFERENCE)}},
                      optim={"epochs": 1, "batch_size": 16}, train={"max_steps_per_epoch": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Trainer(cfg, run_dir).fit()
    return run_dir / "last.safetensors"


def predict_slide(model: Path, slide: Path, out: Path, *flags: str) -> np.ndarray:
    assert main(["predict", str(model), str(slide), "--out", str(out), "--batch-size", "16", *flags]) == 0
    tiles = pd.read_csv(out / f"{slide.stem}.csv")
    assert len(tiles) == len(cells())
    return tiles[PROBS].to_numpy(dtype=float)


def without_stain_norm(checkpoint: Path, out: Path) -> Path:
    state, meta = load_model_checkpoint(checkpoint)
    meta.stain_norm = None
    save_model_checkpoint(out, state, meta)
    return out


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalised_model_predicts_the_same_from_pytorch_and_onnx(tmp_path, method):
    checkpoint = train_normalised(tmp_path, method)
    meta = read_metadata(checkpoint)
    assert meta.stain_norm["method"] == method and meta.stain_norm["reference"] == REFERENCE.name
    assert meta.stain_norm["params"] and meta.config["data"]["stain_normalize"]["method"] == method
    onnx_path = tmp_path / "model.onnx"
    export_onnx(checkpoint, onnx_path, dynamic_batch=True)
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["stain_normalization"]) == meta.stain_norm  # the parameters, not only a path
    assert "stain-normalised" in props["input"]

    slide = make_slide(tmp_path / "slide.tif")
    eager = predict_slide(checkpoint, slide, tmp_path / "eager")
    exported = predict_slide(onnx_path, slide, tmp_path / "onnx", "--workers", "1")
    delta = np.abs(exported - eager).max()
    assert delta <= 1e-5, f"slide: max |delta prob| ONNX Runtime vs PyTorch {delta:.2e}"

    raw = predict_slide(without_stain_norm(checkpoint, tmp_path / "raw.safetensors"), slide, tmp_path / "raw")
    assert np.abs(raw - eager).max() > 1e-3  # the normalisation changes what the model sees

    tiles = DEMO / "lung_scc"
    cpu = torch.device("cpu")
    frames = [predict_folder(m, tiles, tmp_path / f"{m.stem}.csv", cpu, batch_size=32, progress=False)
              for m in (checkpoint, onnx_path)]
    assert np.abs(frames[0][PROBS].to_numpy() - frames[1][PROBS].to_numpy()).max() <= 1e-5


def test_a_model_without_stain_normalisation_is_unaffected(tmp_path):
    old = write_teacher(tmp_path / "old.safetensors", CLASSES)  # written as before: no stain_norm key
    header = read_metadata(old)
    assert header.stain_norm is None
    tile = decode_tile(str(REFERENCE), 32)
    plain = build_eval_transform(AugmentConfig(mean=tuple(header.mean), std=tuple(header.std)))
    assert torch.equal(eval_transform(header)(tile), plain(tile))


def test_a_teacher_trained_without_the_students_normalisation_is_named(tmp_path, caplog):
    teacher = read_metadata(write_teacher(tmp_path / "teacher.safetensors", CLASSES))
    cfg = tiny_config(tmp_path, DEMO, data={"stain_normalize": {"method": "reinhard", "reference": str(REFERENCE)}})
    check_resolution(cfg, teacher, "teacher t")
    assert "teacher t was trained with stain normalisation none, this run uses reinhard" in caplog.text
