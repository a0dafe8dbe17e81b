"""Using a finished model: load a checkpoint, evaluate it on labelled data, predict a folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from moma.config import AugmentConfig
from moma.data.dataset import TileDataset
from moma.data.splits import apply_split, load_split
from moma.data.stain_norm import StainNormalizer, StainReference
from moma.data.tiles import TileTable, is_image_file, scan_tiles
from moma.data.transforms import build_eval_transform
from moma.distill.registry import get_method
from moma.engine.checkpoint import ModelMetadata, load_model_checkpoint
from moma.engine.evaluate import evaluate, predict_probs, predictions_frame, write_split_report, eval_loader
from moma.engine.layout import EVAL_TAG
from moma.errors import CheckpointError, DataError
from moma.models.backbone import create_backbone, load_backbone_weights
from moma.models.deployed import DeployedClassifier, split_deploy_state
from moma.models.vit_layouts import imported_build
from moma.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def load_classifier(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, ModelMetadata]:
    if Path(path).suffix == ".onnx":
        from moma.engine.onnx_runtime import load_onnx_classifier

        return load_onnx_classifier(path, device)
    state, meta = load_model_checkpoint(path)
    if not meta.class_names:
        raise CheckpointError(f"checkpoint {path} is a features-only teacher (no classifier): it cannot classify "
                              "tiles; use it as --teacher for a feature method")
    backbone = create_backbone(meta.arch, meta.num_classes, **imported_build(meta))
    backbone_state, head_state = split_deploy_state(state)
    head = None
    if meta.head is not None:
        head = get_method(meta.head["method"]).build_deploy_head(meta.head["spec"])
        head.load_state_dict(head_state)
    load_backbone_weights(backbone, backbone_state, f"checkpoint {path}", new_classifier_ok=False)
    model = DeployedClassifier(backbone, head).to(device).eval()
    return model, meta


def eval_transform(meta: ModelMetadata):
    """What a model's input goes through, for tiles and slides alike: its stain normalisation when it
    was trained with one, then its mean/std."""
    return build_eval_transform(AugmentConfig(mean=tuple(meta.mean), std=tuple(meta.std)), stain_normalizer(meta))


def stain_normalizer(meta: ModelMetadata) -> StainNormalizer | None:
    if not meta.stain_norm:
        return None
    try:
        return StainNormalizer(StainReference.from_dict(meta.stain_norm))
    except ValueError as exc:
        raise CheckpointError(f"model metadata: {exc}") from None


def _check_data_resolution(meta: ModelMetadata, mpp: float | None) -> None:
    if meta.mpp_differs(mpp):
        log.warning("the model was trained at %.3g um/px but the data is %.3g um/px: expect worse results", meta.mpp, mpp)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, out_dir: Path, device: torch.device,
                        split_file: str | Path | None = None, split: str = "test", mpp: float | None = None,
                        batch_size: int = 128, skip_bad: bool = False, progress: bool = True) -> dict:
    """Metrics of a checkpoint on labelled data (all of it, or one split of a saved split.csv)."""
    model, meta = load_classifier(checkpoint, device)
    _check_data_resolution(meta, mpp)
    table = scan_tiles(data, classes=meta.class_names)
    if split_file is not None:
        table = apply_split(table, load_split(split_file))[split]
        if len(table) == 0:
            raise DataError(f"split file {split_file}: the {split} split is empty")
    dataset = TileDataset(table, meta.image_size, eval_transform(meta), cache=False, skip_bad=skip_bad,
                          progress=progress, description="tiles")
    metrics, probs = evaluate(model, dataset, device, batch_size=batch_size, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_split_report(out_dir, EVAL_TAG, metrics, dataset, probs, title=f"{Path(data).name}: {meta.arch}")
    return metrics


def _folder_table(folder: Path) -> TileTable:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of tiles")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise DataError(f"{folder}: no image tiles found")
    frame = pd.DataFrame({"path": [str(p) for p in files], "rel_path": [str(p.relative_to(folder)) for p in files]})
    frame["label"] = ""
    frame["target"] = 0
    return TileTable(folder, frame, ["?", "?"])


def predict_folder(checkpoint: str | Path, folder: str | Path, out_csv: Path, device: torch.device,
                   batch_size: int = 128, skip_bad: bool = False, progress: bool = True) -> pd.DataFrame:
    """Label and class probabilities for every tile under ``folder`` (recursively), as CSV."""
    model, meta = load_classifier(checkpoint, device)
    table = _folder_table(Path(folder))
    dataset = TileDataset(table, meta.image_size, eval_transform(meta), cache=False, skip_bad=skip_bad,
                          progress=progress, description="tiles")
    probs, _ = predict_probs(model, eval_loader(dataset, batch_size), device, progress=progress, desc="predicting")
    frame = predictions_frame(dataset, probs, meta.class_names).drop(columns=["label"])
    atomic_write_text(out_csv, frame.to_csv(index=False))
    return frame
