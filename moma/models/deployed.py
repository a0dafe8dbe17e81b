"""The model users get: a timm classifier, optionally with a method's replacement head (SimKD
classifies with the teacher's classifier behind a connector), and its checkpoint keys."""

from __future__ import annotations

import torch
from torch import nn

HEAD_PREFIX = "deploy_head."


def split_deploy_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone weights with plain timm keys, head weights without their ``deploy_head.`` prefix)."""
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k.removeprefix(HEAD_PREFIX): v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return backbone, head


class DeployedClassifier(nn.Module):
    """A timm classifier, optionally with a replacement head fed by ``forward_features``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.backbone(x)
        return self.head(self.backbone.forward_features(x))

    def deploy_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain timm keys for the backbone (loadable by ``timm.create_model``) + ``deploy_head.*``."""
        state = dict(self.backbone.state_dict())
        if self.head is not None:
            state.update({f"{HEAD_PREFIX}{k}": v for k, v in self.head.state_dict().items()})
        return state

    def load_deploy_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`deploy_state_dict`."""
        backbone, head = split_deploy_state(state)
        self.backbone.load_state_dict(backbone)
        if self.head is not None:
            self.head.load_state_dict(head)
