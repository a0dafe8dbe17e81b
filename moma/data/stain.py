"""H&E stain augmentation: random scaling and shifting of the haematoxylin, eosin and DAB
channels in optical-density space (Tellez et al., "Whole-slide mitosis detection in H&E breast
histology using PHH3 as a reference to train distilled stain-invariant convolutional networks",
IEEE TMI 2018). The colour deconvolution itself is scikit-image's ``rgb2hed``/``hed2rgb``
(Ruifrok & Johnston 2001)."""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import hed2rgb, rgb2hed


class HEDJitter(torch.nn.Module):
    """For each stain channel c: s_c <- s_c * a_c + b_c, a_c ~ U(1-t, 1+t), b_c ~ U(-t, t) * range_c.

    Works on uint8 CHW tensors and returns uint8, so it composes with torchvision's v2 transforms.
    The random numbers come from torch's generator, so seeding torch seeds this too.
    """

    def __init__(self, strength: float = 0.05):
        super().__init__()
        self.strength = float(strength)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.strength <= 0:
            return image
        rgb = image.permute(1, 2, 0).numpy().astype(np.float64) / 255.0
        hed = rgb2hed(rgb)
        alpha = 1.0 + (torch.rand(3, dtype=torch.float64).numpy() * 2 - 1) * self.strength
        beta = (torch.rand(3, dtype=torch.float64).numpy() * 2 - 1) * self.strength
        span = np.maximum(hed.reshape(-1, 3).max(axis=0), 1e-3)
        jittered = hed * alpha + beta * span
        out = np.clip(hed2rgb(jittered), 0.0, 1.0)
        return torch.from_numpy((out * 255.0 + 0.5).astype(np.uint8)).permute(2, 0, 1).contiguous()

    def extra_repr(self) -> str:
        return f"strength={self.strength}"
