"""Models: timm backbones (never downloaded), feature taps for the distillation methods, and the
deployed classifier users get."""
