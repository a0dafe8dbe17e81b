"""Evaluation and prediction: probabilities over a loader, metrics, reports on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from moma.data.dataset import TileDataset
from moma.engine.device import autocast
from moma.engine.layout import report_file
from moma.engine.plots import plot_confusion
from moma.metrics import compute_metrics
from moma.utils.io import atomic_write_json, atomic_write_text


# Batches each loader worker prepares ahead (torch's default is 2): with pinned memory and a GPU
# step shorter than a batch's preparation, a deeper queue absorbs the workers' uneven pace.
PREFETCH_BATCHES = 4


@torch.no_grad()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype=None,
                  channels_last: bool = False, progress: bool = False, desc: str = "evaluating") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and targets (N,) in loader order."""
    was_training = model.training
    model.eval()
    probs, targets = [], []
    for images, target, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        probs.append(F.softmax(logits.float(), dim=1).cpu())
        targets.append(target)
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def eval_loader(dataset: TileDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=PREFETCH_BATCHES if num_workers > 0 else None)


def evaluate(model: nn.Module, dataset: TileDataset, device: torch.device, batch_size: int = 128, **kwargs) -> tuple[dict, np.ndarray]:
    loader = eval_loader(dataset, batch_size, pin_memory=device.type == "cuda")
    probs, targets = predict_probs(model, loader, device, **kwargs)
    return metrics_from_probs(targets, probs, dataset.classes), probs


def metrics_from_probs(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """The classification metrics and the mean negative log-likelihood of predicted probabilities."""
    metrics = compute_metrics(targets, probs, classes)
    metrics["loss"] = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(targets)))
    return metrics


def predictions_frame(dataset: TileDataset, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"path": dataset.table.frame["rel_path"].to_numpy()})
    if "label" in dataset.table.frame:
        frame["label"] = dataset.table.frame["label"].to_numpy()
    frame["prediction"] = [class_names[i] for i in probs.argmax(axis=1)]
    for i, name in enumerate(class_names):
        frame[f"prob_{name}"] = np.round(probs[:, i], 6)
    return frame


def write_split_report(out_dir: Path, tag: str, metrics: dict, dataset: TileDataset, probs: np.ndarray, title: str) -> None:
    """metrics_<tag>.json, confusion_<tag>.png/.csv and predictions_<tag>.csv."""
    names = metrics["class_names"]
    atomic_write_json(out_dir / report_file("metrics", tag), metrics)
    cm = pd.DataFrame(metrics["confusion_matrix"], index=[f"true_{n}" for n in names], columns=[f"pred_{n}" for n in names])
    atomic_write_text(out_dir / report_file("confusion_csv", tag), cm.to_csv())
    plot_confusion(metrics["confusion_matrix"], names, out_dir / report_file("confusion_png", tag), title=title)
    atomic_write_text(out_dir / report_file("predictions", tag), predictions_frame(dataset, probs, names).to_csv(index=False))
