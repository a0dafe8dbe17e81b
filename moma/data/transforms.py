"""Tile transforms. Tiles arrive as uint8 CHW tensors already resized to the configured size.

Training: random flips and 90-degree rotations (histology has no 'up'), RandAugment as in the
paper, optional H&E stain jitter; then float conversion and normalisation. Evaluation:
normalisation only. The mean/std used are stored in every checkpoint.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from moma.config import AugmentConfig
from moma.data.stain import HEDJitter

# The paper uses timm's "rand-n2-m10-mstd0.5": magnitude on a 0..10 scale. torchvision's
# RandAugment spreads its magnitude over 31 bins (0..30) covering the same op ranges, so the
# paper's level m maps to bin 3 * m.
_TIMM_LEVEL_TO_TV_BIN = 3


class RandomRot90(torch.nn.Module):
    """Rotate by k * 90 degrees, k uniform in {0, 1, 2, 3}."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, (1,)))
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


def normalize_transform(aug: AugmentConfig) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std))])


def build_train_transform(aug: AugmentConfig) -> v2.Compose:
    steps: list[torch.nn.Module] = []
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.randaugment and aug.ra_num_ops > 0:
        fill = [int(round(255 * m)) for m in aug.mean]
        steps.append(
            v2.RandAugment(num_ops=aug.ra_num_ops, magnitude=aug.ra_magnitude * _TIMM_LEVEL_TO_TV_BIN,
                           num_magnitude_bins=31, fill=fill)
        )
    if aug.stain_jitter > 0:
        steps.append(HEDJitter(aug.stain_jitter))
    return v2.Compose(steps + list(normalize_transform(aug).transforms))


def build_eval_transform(aug: AugmentConfig) -> v2.Compose:
    return normalize_transform(aug)
