"""Checkpoints.

Two kinds, both written atomically (temporary file + rename):

- the *model checkpoint* (``best.safetensors``, ``last.safetensors``): the deployable student's
  weights in safetensors, with metadata (architecture, class names, tile size, microns per pixel,
  normalisation, deploy head, config, versions) in the safetensors header under the key ``moma``.
  The backbone keys are plain timm keys, so ``timm.create_model(arch)`` can load them directly.
- the *training state* (``state.pt``): everything needed to resume (the whole distillation task
  with teacher, heads and queues; optimiser; scheduler; grad scaler; RNG states; history).
"""

from __future__ import annotations

import json
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moma.errors import CheckpointError
from moma.utils.io import atomic_path

FORMAT_VERSION = 1
METADATA_KEY = "moma"


def versions() -> dict[str, str]:
    import timm

    import moma

    return {
        "moma": moma.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ModelMetadata:
    arch: str
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    mpp: float | None = None
    method: str = "none"
    head: dict | None = None  # {"method": name, "spec": {...}} when a deploy head replaces the classifier
    epoch: int | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> "ModelMetadata":
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{origin}: incomplete moma metadata ({exc})") from None


def save_model_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: ModelMetadata) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = {METADATA_KEY: json.dumps(meta.__dict__, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_metadata(path: str | Path) -> ModelMetadata:
    from safetensors import safe_open

    path = _checkpoint_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"checkpoint {path}: no moma metadata; was it written by moma-distill?")
    return ModelMetadata.from_dict(json.loads(header[METADATA_KEY]), str(path))


def load_model_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelMetadata]:
    path = _checkpoint_file(path)
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc})") from None
    return state, meta


def _checkpoint_file(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (then its best.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (give a .safetensors file or a run folder)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found: this run has no completed epoch to resume from")
    try:
        # Our own file: it holds optimiser state and RNG tuples, which need full unpickling.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"training state {path}: cannot be read ({exc})") from None
