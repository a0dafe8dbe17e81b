"""Feature taps: one forward pass that yields logits, the pooled embedding and intermediate maps.

Intermediate maps come from timm's own ``forward_intermediates`` (indices into the model's
``feature_info`` stages), or, for models without it, from forward hooks on the modules that
``feature_info`` names. No model is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TapOutputs:
    """What a network produced for one batch."""

    logits: torch.Tensor
    embedding: torch.Tensor
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # stage index -> feature map
    feature_map: torch.Tensor | None = None  # output of forward_features (before pooling)


def num_stages(model: nn.Module) -> int:
    return len(model.feature_info) if hasattr(model, "feature_info") else 0


def resolve_stage(model: nn.Module, index: int) -> int:
    """Turn a possibly negative stage index into a positive one, validated."""
    n = num_stages(model)
    positive = index + n if index < 0 else index
    if not 0 <= positive < n:
        raise IndexError(f"feature stage {index} out of range for a model with {n} stages")
    return positive


class FeatureTap(nn.Module):
    """Wraps a timm classifier; ``forward(x)`` returns :class:`TapOutputs`.

    ``stages`` lists the feature_info stage indices (negative allowed) whose maps are wanted.
    """

    def __init__(self, model: nn.Module, stages: tuple[int, ...] = ()):
        super().__init__()
        self.model = model
        self.stages = tuple(sorted({resolve_stage(model, s) for s in stages}))
        self._use_hooks = bool(self.stages) and not hasattr(model, "forward_intermediates")
        self._hooked: dict[int, torch.Tensor] = {}
        if self._use_hooks:
            self._install_hooks()

    def _install_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for stage in self.stages:
            name = self.model.feature_info[stage]["module"]

            def hook(_module, _inputs, output, stage=stage):
                self._hooked[stage] = output

            modules[name].register_forward_hook(hook)

    def set_stages(self, stages: tuple[int, ...]) -> None:
        self.stages = tuple(sorted({resolve_stage(self.model, s) for s in stages}))
        if self.stages and not hasattr(self.model, "forward_intermediates") and not self._use_hooks:
            self._use_hooks = True
            self._install_hooks()

    def forward(self, x: torch.Tensor) -> TapOutputs:
        features: dict[int, torch.Tensor] = {}
        if self.stages and not self._use_hooks:
            final, maps = self.model.forward_intermediates(x, indices=list(self.stages), intermediates_only=False)
            features = dict(zip(self.stages, maps))
        else:
            self._hooked.clear()
            final = self.model.forward_features(x)
            features = {s: self._hooked[s] for s in self.stages}
        embedding = self.model.forward_head(final, pre_logits=True)
        logits = self.model.get_classifier()(embedding) if _head_is_linear(self.model) else self.model.forward_head(final)
        return TapOutputs(logits=logits, embedding=embedding, features=features, feature_map=final)


def _head_is_linear(model: nn.Module) -> bool:
    """True when logits = classifier(pre-logits), so the head need not run twice."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    return isinstance(classifier, (nn.Linear, nn.Identity))
