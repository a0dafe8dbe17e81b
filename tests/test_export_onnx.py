"""`moma export --format onnx`: ONNX Runtime gives PyTorch's probabilities on the shipped tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from conftest import make_tile_folder, tiny_config, write_teacher
from moma.cli import main
from moma.engine.export import export_onnx
from moma.data.dataset import TileDataset
from moma.engine.evaluate import eval_loader, predict_probs
from moma.data.tiles import TileTable, scan_tiles
from moma.engine.inference import eval_transform, load_classifier, predict_folder
from moma.engine.trainer import Trainer

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "lc25000_lung"
CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def train_student(tmp_path: Path, method: str) -> Path:
    """Two steps of training on the shipped 64 px tiles: a real student checkpoint in seconds."""
    distill = {"method": method}
    if method != "none":
        distill["teacher"] = str(write_teacher(tmp_path / "teacher.safetensors", CLASSES))
    cfg = tiny_config(tmp_path, DEMO, data={"image_size": 64}, optim={"epochs": 1, "batch_size": 16},
                      train={"max_steps_per_epoch": 2}, distill=distill)
    run_dir = tmp_path / method
    run_dir.mkdir()
    Trainer(cfg, run_dir).fit()
    return run_dir / "last.safetensors"


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    """A plain student and a SimKD student (with its replacement head), trained once for this module."""
    return {method: train_student(tmp_path_factory.mktemp(method), method) for method in ("none", "simkd")}


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"prob_{name}" for name in CLASSES]].to_numpy(dtype=float)


@pytest.mark.parametrize("method", ["none", "simkd"])
def test_onnx_runtime_matches_pytorch_on_the_shipped_tiles_with_a_dynamic_batch(tmp_path, students, method):
    checkpoint = students[method]
    onnx_path = tmp_path / "student.onnx"
    report = export_onnx(checkpoint, onnx_path, dynamic_batch=True)
    assert report["max_prob_diff"] <= 1e-4

    cpu = torch.device("cpu")
    tiles = DEMO / "lung_scc"
    eager = predict_folder(checkpoint, tiles, tmp_path / "eager.csv", cpu, batch_size=64, progress=False)
    # 48 tiles per run and a shorter last batch: the exported batch axis really is dynamic
    exported = predict_folder(onnx_path, tiles, tmp_path / "onnx.csv", cpu, batch_size=48, progress=False)
    assert len(exported) == len(eager) == len(list(tiles.glob("*.png"))) and len(exported) % 48 != 0
    assert list(exported.columns) == list(eager.columns) and list(exported["path"]) == list(eager["path"])
    assert np.abs(probabilities(exported) - probabilities(eager)).max() <= 1e-4  # the CSVs round to 6 decimals
    assert (exported["prediction"] == eager["prediction"]).all()

    # unrounded: the same tiles, read and normalised once, through both models
    model, meta = load_classifier(checkpoint, cpu)
    onnx_model, _ = load_classifier(onnx_path, cpu)
    table = scan_tiles(DEMO)
    table = TileTable(table.source, table.frame[table.frame["label"] == tiles.name].reset_index(drop=True), table.classes)
    dataset = TileDataset(table, meta.image_size, eval_transform(meta), cache=True)
    torch_probs, _ = predict_probs(model, eval_loader(dataset, 48), cpu)
    onnx_probs, _ = predict_probs(onnx_model, eval_loader(dataset, 48), cpu)
    delta = np.abs(onnx_probs - torch_probs).max()
    assert delta <= 1e-4, f"max |delta prob| {delta:.2e}"
    print(f"{method}: max |delta prob| ONNX Runtime vs PyTorch over {len(dataset)} shipped tiles: {delta:.2e}")

    if method == "simkd":  # the graph holds the replacement head, not the student's unused classifier
        model, _ = load_classifier(checkpoint, cpu)
        images = torch.randn(4, 3, 64, 64)
        with torch.no_grad():
            own_head = torch.softmax(model.backbone(images), dim=1)
            onnx_model, _ = load_classifier(onnx_path, cpu)
            deployed = torch.softmax(onnx_model(images), dim=1)
        assert (own_head - deployed).abs().max() > 1e-3


def test_the_onnx_file_carries_the_metadata(tmp_path, students):
    checkpoint = students["simkd"]
    onnx_path = tmp_path / "student.onnx"
    export_onnx(checkpoint, onnx_path, opset=18, dynamic_batch=True)
    proto = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert json.loads(props["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(props["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert props["image_size"] == "64" and props["method"] == "simkd" and props["deploy_head"] == "simkd"
    assert props["arch"] == "test_resnet" and props["mpp"] == ""
    assert json.loads(props["moma"])["class_names"] == CLASSES
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert any(o.version == 18 for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_a_fixed_batch_export_predicts_in_chunks(tmp_path, capsys):
    checkpoint = write_teacher(tmp_path / "model.safetensors", ["immune", "stroma", "tumour"])
    tiles = make_tile_folder(tmp_path / "tiles", per_class=3, manifest=False)
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    shape = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape] == [1, 3, 32, 32]
    capsys.readouterr()
    for source, out in ((checkpoint, "eager.csv"), (tmp_path / "m.onnx", "onnx.csv")):
        assert main(["predict", str(source), str(tiles), "--batch-size", "4", "--out", str(tmp_path / out)]) == 0
    eager, exported = pd.read_csv(tmp_path / "eager.csv"), pd.read_csv(tmp_path / "onnx.csv")
    assert len(exported) == 9 and list(exported["path"]) == list(eager["path"])
    columns = [c for c in eager.columns if c.startswith("prob_")]
    assert np.abs(exported[columns].to_numpy() - eager[columns].to_numpy()).max() <= 1e-4  # CSV keeps 6 decimals


def test_export_errors_are_one_line(tmp_path, capsys):
    checkpoint = write_teacher(tmp_path / "model.safetensors", ["a", "b"])
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.txt")]) == 2
    assert main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moma: error")]
    assert len(errors) == 2 and "ending in .onnx" in errors[0] and "missing.safetensors not found" in errors[1]
    assert not (tmp_path / "m.onnx").exists()
