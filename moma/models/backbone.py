"""timm backbones, always built with ``pretrained=False``; initial weights only from local files."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from moma.errors import CheckpointError, ConfigError
from moma.models.external import read_weights_file
from moma.models.vit_layouts import set_embedding, timm_kwargs

log = logging.getLogger(__name__)


def create_backbone(arch: str, num_classes: int, drop_rate: float | None = None, model_args: dict | None = None,
                    embedding: str | None = None) -> nn.Module:
    """A timm model by name with a fresh ``num_classes`` classifier. Never downloads anything.
    ``model_args``/``embedding``: what an imported teacher records (moma.models.vit_layouts)."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.arch '{arch}' is not a timm model{hint}")
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs, **timm_kwargs(model_args))
    return set_embedding(model, embedding)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights for ``model.weights`` / ``distill.student_init``: read as ``moma import-teacher`` reads
    them (format by content, ``weights_only`` loading, wrapper dicts, DDP / compile prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    return read_weights_file(path)


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Same model class and the same parameter and buffer names and shapes."""
    shapes = [{name: tuple(t.shape) for name, t in m.state_dict().items()} for m in (a, b)]
    return type(a) is type(b) and shapes[0] == shapes[1]


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str,
                          new_classifier_ok: bool = True) -> list[str]:
    """Load ``state`` into a timm model. With ``new_classifier_ok``, classifier weights whose shape
    differs (another class list) are dropped so the classifier stays freshly initialised; returns
    the names of dropped keys. Anything else that does not fit is an error naming the file."""
    own = model.state_dict()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    classifier_keys = {f"{name}" for name, _ in _named_tensors_of(model, classifier)}
    dropped = [k for k in state if new_classifier_ok and k in classifier_keys and state[k].shape != own[k].shape]
    filtered = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in filtered and (k not in classifier_keys or not new_classifier_ok)]
    unexpected = [k for k in filtered if k not in own]
    mismatched = [k for k in filtered if k in own and filtered[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        first = (missing or unexpected or mismatched)[0]
        raise CheckpointError(
            f"{origin}: weights do not fit this architecture ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mis-shaped keys, e.g. '{first}'); check model.arch"
        )
    model.load_state_dict(filtered, strict=False)
    if dropped:
        log.info("%s: classifier re-initialised (class list differs)", origin)
    return dropped


def _named_tensors_of(model: nn.Module, module: nn.Module | None):
    if module is None or isinstance(module, nn.Identity):
        return []
    ids = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    return [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) in ids]
