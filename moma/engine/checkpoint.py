"""Model checkpoints (``best.safetensors``, ``last.safetensors``), written atomically.

The deployable student's weights in safetensors, with metadata (architecture, class names, tile
size, microns per pixel, normalisation, stain normalisation, deploy head, config, versions) in the
safetensors header under the key ``moma``. The backbone keys are plain timm keys, so
``timm.create_model(arch)`` can load them directly. The training state a run resumes from is
:mod:`moma.engine.state`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moma.engine.layout import BEST_NAME
from moma.errors import CheckpointError
from moma.utils.io import atomic_path

FORMAT_VERSION = 1
METADATA_KEY = "moma"
MPP_TOLERANCE = 0.1  # relative difference in microns per pixel that is worth a warning


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
    # {"method", "reference", "params"} (moma.data.stain_norm.StainReference) when trained on stain-normalised tiles
    stain_norm: dict | None = None
    epoch: int | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def mpp_differs(self, mpp: float | None) -> bool:
        """True when both resolutions are known and ``mpp`` is more than 10% off the model's."""
        return bool(self.mpp and mpp and abs(self.mpp - mpp) / self.mpp > MPP_TOLERANCE)

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
        path = path / BEST_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (give a .safetensors file or a run folder)")
    return path
