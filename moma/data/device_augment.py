"""Photometric augmentation of whole batches on the device (``data.augment_on: device``).

With ``data.augment_on: loader`` (the default) each tile is augmented and normalised on the CPU by
the loader's workers (:mod:`moma.data.transforms`). On a GPU that per-tile float work, not reading
the tile, limits a loader fed by the uint8 tile store (``data.cache: disk``). With
``data.augment_on: device`` the training transform keeps on the CPU only what must stay per tile,
stain normalisation (``data.stain_normalize``) and the geometric view (:class:`DeviceViews`: one
view number drawn from :func:`moma.data.views.view_group` and applied to the uint8 tile), and the
loader hands out uint8 tiles in their views with the view numbers, as before. Once the batch is on
the device, :class:`DeviceAugment` turns it into float, applies the H&E stain jitter
(``augment.stain_jitter``, and ``augment.strong_stain_jitter`` for the strong view) with
independent random factors per sample in one batched operation, and normalises. In two-view
mode (``data.strong_augment``) it returns ``(strong view, weak view)`` as
:class:`~moma.data.transforms.TwoViews` does; the weak view is the plain normalised view, equal to
the loader path's.

Not on the device: RandAugment, and the strong view's colour jitter and blur; a config asking for
them with ``augment_on: device`` is refused when it is read. The stain jitter works in float and is
not rounded to uint8 between steps as the loader's :class:`~moma.data.stain.HEDJitter` is, so the
two paths give the same distribution of views, not the same pixels.

The random factors come from a ``torch.Generator`` on the device seeded per step from (run seed,
epoch, step, rank) (:func:`step_seed`), so a resumed run augments as the uninterrupted one did.
"""

from __future__ import annotations

import math

import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as F

from moma.config import AugmentConfig
from moma.data.transforms import ViewedTransform

# scikit-image's colour deconvolution (Ruifrok & Johnston 2001), as HEDJitter uses it.
_RGB_FROM_HED = torch.from_numpy(rgb_from_hed)
_HED_FROM_RGB = torch.from_numpy(hed_from_rgb)
_LOG_ADJUST = math.log(1e-6)


def step_seed(seed: int, epoch: int, step: int, rank: int = 0, world_size: int = 1) -> int:
    """The seed of one training step's device augmentation: the same after a resume, distinct per rank."""
    return (seed * 1_000_033 + epoch * 7_919 + (step * world_size + rank) * 104_729 + 0xA06) % (2**63 - 1)


class DeviceViews(ViewedTransform):
    """The per-tile part of ``augment_on: device``: stain normalisation and one drawn view of the
    uint8 tile, returned as uint8 (with the view number from ``with_view``); the rest is
    :class:`DeviceAugment`'s, on the batch. The teacher's view is pure when it gets the weak view
    (two views) or when the one view has no stain jitter."""

    def __init__(self, aug: AugmentConfig, strong_augment: bool, stain: torch.nn.Module | None = None):
        super().__init__(aug, stain)
        self.teacher_view_is_pure = strong_augment or aug.stain_jitter <= 0

    def finish(self, viewed: torch.Tensor) -> torch.Tensor:
        return viewed


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``images`` (N, 3, H, W) float RGB in [0, 1] with each sample's H, E and D stain scaled by
    ``alpha`` (N, 3) and shifted by ``beta`` (N, 3) times the sample's largest stain value, as
    :class:`~moma.data.stain.HEDJitter` does to one tile (without its rounding to uint8)."""
    hed_from_rgb = _HED_FROM_RGB.to(images.device, images.dtype)
    rgb_from_hed = _RGB_FROM_HED.to(images.device, images.dtype)
    density = torch.log(images.clamp(min=1e-6)) / _LOG_ADJUST
    stains = torch.einsum("nchw,cd->ndhw", density, hed_from_rgb).clamp(min=0)
    span = stains.amax(dim=(2, 3)).clamp(min=1e-3)
    stains = stains * alpha[:, :, None, None] + (beta * span)[:, :, None, None]
    log_rgb = torch.einsum("nchw,cd->ndhw", stains * _LOG_ADJUST, rgb_from_hed)
    return torch.exp(log_rgb).clamp(0.0, 1.0)


class DeviceAugment(torch.nn.Module):
    """uint8 (N, 3, H, W) batch in its views -> the normalised student view, or with ``two_views``
    ``(strong view for the student, weak view for the teacher)``."""

    def __init__(self, aug: AugmentConfig, two_views: bool):
        super().__init__()
        self.mean, self.std = list(aug.mean), list(aug.std)
        self.two_views = two_views
        # The loader path: TrainTransform adds stain_jitter to the one view; TwoViews gives the
        # strong view stain_jitter and then strong_stain_jitter.
        self.jitters = [s for s in (aug.stain_jitter, aug.strong_stain_jitter if two_views else 0.0) if s > 0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images, self.mean, self.std)

    def jitter(self, images: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
        """HED jitter with factors drawn per sample: a ~ U(1-t, 1+t), b ~ U(-t, t)."""
        if strength <= 0:
            return images
        draws = torch.rand((2, len(images), 3), generator=generator, device=images.device, dtype=images.dtype)
        alpha, beta = 1.0 + (draws[0] * 2 - 1) * strength, (draws[1] * 2 - 1) * strength
        return hed_jitter(images, alpha, beta)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        plain = F.to_dtype(images, torch.float32, scale=True)
        strong = plain
        for strength in self.jitters:
            strong = self.jitter(strong, strength, generator)
        student = self.normalize(strong)
        if not self.two_views:
            return student
        return student, self.normalize(plain)

    def extra_repr(self) -> str:
        return f"two_views={self.two_views}, stain_jitters={self.jitters}"
