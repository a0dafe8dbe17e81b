"""Tile transforms. Tiles arrive as uint8 CHW tensors already resized to the configured size.

Training: random flips and 90-degree rotations (histology has no 'up'), RandAugment as in the
paper, optional H&E stain jitter; then float conversion and normalisation. Evaluation:
normalisation only. The mean/std used are stored in every checkpoint.

Two views (``data.strong_augment``, as Noisy Student and FixMatch): one decode and one geometric
draw (flips, 90-degree rotations) give the teacher's *weak* view; the student's *strong* view adds
the training transform's RandAugment and stain jitter to the same geometric view (so a student
sees what it sees without a teacher), and optionally more H&E stain jitter (Tellez et al. 2018),
colour jitter and blur (``augment.strong_*``, off by default).

Stain normalisation (``data.stain_normalize``, :mod:`moma.data.stain_norm`) is the first step of
every transform, before any augmentation: training, evaluation, the unlabelled pool, and both views
(the teacher's weak view included), so every model sees the reference's colours.
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


def build_train_transform(aug: AugmentConfig, stain: torch.nn.Module | None = None) -> v2.Compose:
    steps = _stain_steps(stain) + _geometric_steps(aug) + _photometric_steps(aug)
    return v2.Compose(steps + list(normalize_transform(aug).transforms))


def build_eval_transform(aug: AugmentConfig, stain: torch.nn.Module | None = None) -> v2.Compose:
    if stain is None:
        return normalize_transform(aug)
    return v2.Compose(_stain_steps(stain) + list(normalize_transform(aug).transforms))


def _stain_steps(stain: torch.nn.Module | None) -> list[torch.nn.Module]:
    return [] if stain is None else [stain]


def _geometric_steps(aug: AugmentConfig) -> list[torch.nn.Module]:
    steps: list[torch.nn.Module] = []
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rot90:
        steps.append(RandomRot90())
    return steps


def _photometric_steps(aug: AugmentConfig) -> list[torch.nn.Module]:
    """What the training transform adds to the geometric draw: RandAugment and H&E stain jitter."""
    steps: list[torch.nn.Module] = []
    if aug.randaugment and aug.ra_num_ops > 0:
        fill = [int(round(255 * m)) for m in aug.mean]
        steps.append(v2.RandAugment(num_ops=aug.ra_num_ops, magnitude=aug.ra_magnitude * _TIMM_LEVEL_TO_TV_BIN,
                                    num_magnitude_bins=31, fill=fill))
    if aug.stain_jitter > 0:
        steps.append(HEDJitter(aug.stain_jitter))
    return steps


def _strong_photometric(aug: AugmentConfig) -> torch.nn.Module:
    """The strong view: the training transform's RandAugment and stain jitter, plus the optional
    extras (off by default: at 64 px and 80 steps they cost the labels-only student from random
    weights about 0.3 macro F1; BENCHMARKS.md)."""
    steps = _photometric_steps(aug)
    if aug.strong_stain_jitter > 0:
        steps.append(HEDJitter(aug.strong_stain_jitter))
    if aug.strong_color_jitter > 0:
        c = aug.strong_color_jitter
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4)))
    if aug.strong_blur > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=aug.strong_blur))
    return _compose(steps)


def _compose(steps: list[torch.nn.Module]) -> torch.nn.Module:
    return v2.Compose(steps) if steps else torch.nn.Identity()  # v2.Compose refuses an empty list


class TwoViews(torch.nn.Module):
    """uint8 tile -> (strong view for the student, weak view for the teacher), both normalised."""

    def __init__(self, aug: AugmentConfig, stain: torch.nn.Module | None = None):
        super().__init__()
        self.geometric = _compose(_stain_steps(stain) + _geometric_steps(aug))
        self.strong = _strong_photometric(aug)
        self.normalize = normalize_transform(aug)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weak = self.geometric(image)
        return self.normalize(self.strong(weak)), self.normalize(weak)


def build_student_transform(aug: AugmentConfig, strong_augment: bool, stain: torch.nn.Module | None = None):
    """The training transform: one view for student and teacher, or two views with ``strong_augment``."""
    return TwoViews(aug, stain) if strong_augment else build_train_transform(aug, stain)
