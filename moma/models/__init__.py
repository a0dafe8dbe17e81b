"""Models: timm backbones (never downloaded), feature taps for the distillation methods."""

from moma.models.backbone import create_backbone, load_backbone_weights, read_state_dict
from moma.models.taps import FeatureTap, TapOutputs

__all__ = ["FeatureTap", "TapOutputs", "create_backbone", "load_backbone_weights", "read_state_dict"]
