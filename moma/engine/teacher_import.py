"""``moma import-teacher``: an external model written as a teacher checkpoint with full metadata."""

from __future__ import annotations

import logging
from pathlib import Path

from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
from moma.errors import ConfigError
from moma.models.hub_import import ExternalModel, import_external
from moma.models.vit_layouts import EMBEDDINGS, LAYOUTS, embedding_width

log = logging.getLogger(__name__)


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` (or space-separated) -> three floats, for --mean/--std."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give three numbers, e.g. {option} 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise ConfigError(f"{option} {text!r}: give three numbers (one per RGB channel)")
    return values


def import_teacher(source: str | Path, out: str | Path, arch: str | None = None, class_names: list[str] | None = None,
                   features_only: bool = False, image_size: int | None = None, mpp: float | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   embedding: str | None = None, layout: str | None = None) -> ModelMetadata:
    """Read ``source``, check it fits ``arch`` and write it to ``out`` as a teacher checkpoint."""
    if features_only and class_names:
        raise ConfigError("--classes and --features-only exclude each other: a features-only teacher has no classes")
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"--image-size {image_size}: must be a positive number of pixels")
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    if embedding is not None and embedding not in EMBEDDINGS:
        raise ConfigError(f"--embedding {embedding}: choose one of {', '.join(EMBEDDINGS)}")
    external = import_external(source, arch, class_names, features_only, embedding, layout)
    meta = _metadata(external, source, image_size, mpp, mean, std)
    if std is not None and any(v <= 0 for v in meta.std):
        raise ConfigError(f"--std {std}: every value must be positive")
    save_model_checkpoint(out, external.state, meta)
    return meta


def _metadata(external: ExternalModel, source: str | Path, image_size: int | None, mpp: float | None,
              mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> ModelMetadata:
    return ModelMetadata(
        arch=external.arch,
        class_names=external.class_names or [],  # empty: features only
        image_size=image_size or external.image_size,
        mean=list(mean or external.mean),
        std=list(std or external.std),
        mpp=mpp or external.mpp,
        method="imported",
        config={"imported_from": Path(source).name, "layout": external.layout,
                "features_only": external.num_classes == 0, **_build_record(external)},
    )


def _build_record(external: ExternalModel) -> dict:
    """What rebuilds the network (timm arguments, embedding recipe) and which published model it is."""
    record = {}
    if external.model_args:
        record["model_args"] = external.model_args
    if external.embedding:
        record["embedding"] = external.embedding
        width = embedding_width(external.model_args or {}, external.embedding)
        if width:
            record["embedding_dim"] = width
    if external.foundation:
        record["foundation"] = external.foundation.name
        record["source"] = external.foundation.source
    return record
