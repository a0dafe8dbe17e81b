"""Tile transforms. Tiles arrive as uint8 CHW tensors already resized to the configured size.

Training: one of the tile's flip/rotation views (histology has no 'up'), RandAugment as in the
paper, optional H&E stain jitter; then float conversion and normalisation. Evaluation:
normalisation only. The mean/std used are stored in every checkpoint.

The geometric draw picks one view number uniformly from the group the configured flips and
rotations generate (:func:`moma.data.views.view_group`; independent random flips and quarter turns
give each of its elements with the same probability, so the distribution is theirs) and applies it
with :func:`moma.data.views.apply_view`. The training transforms (:class:`ViewedTransform`) report
the view they drew, and the datasets pass it on with each sample, so a training step knows which
view the teacher sees: a teacher cache (``moma embed``) holds the frozen teacher's outputs per tile
and view, and a step reads them instead of running the teacher. That needs the teacher's input to
be a pure view (stain-normalised tile, one view, no photometric change): the weak view of two-view
training, or the single view of a training transform without RandAugment and stain jitter
(:attr:`ViewedTransform.teacher_view_is_pure`).

Two views (``data.strong_augment``, as Noisy Student and FixMatch): one decode and one geometric
draw (flips, 90-degree rotations) give the teacher's *weak* view; the student's *strong* view adds
the training transform's RandAugment and stain jitter to the same geometric view (so a student
sees what it sees without a teacher), and optionally more H&E stain jitter (Tellez et al. 2018),
colour jitter and blur (``augment.strong_*``, off by default).

With ``data.augment_on: device`` the training transform is
:class:`moma.data.device_augment.DeviceViews` (stain normalisation and the view, uint8) and the
photometric part runs per batch on the device (:class:`moma.data.device_augment.DeviceAugment`).

Stain normalisation (``data.stain_normalize``, :mod:`moma.data.stain_norm`) is the first step of
every transform, before any augmentation: training, evaluation, the unlabelled pool, and both views
(the teacher's weak view included), so every model sees the reference's colours.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from moma.config import AugmentConfig
from moma.data.stain import HEDJitter
from moma.data.views import apply_view, view_group

NO_VIEW = -1  # the view of a sample whose transform draws none (evaluation)

# The paper uses timm's "rand-n2-m10-mstd0.5": magnitude on a 0..10 scale. torchvision's
# RandAugment spreads its magnitude over 31 bins (0..30) covering the same op ranges, so the
# paper's level m maps to bin 3 * m.
_TIMM_LEVEL_TO_TV_BIN = 3


class RandomView(torch.nn.Module):
    """One view drawn uniformly from ``views`` (view numbers of :mod:`moma.data.views`) and applied.
    ``draw`` also returns the number; a ``choices`` argument narrows the draw to those views (a
    teacher cache that holds a fixed subset of each tile's views)."""

    def __init__(self, views: tuple[int, ...]):
        super().__init__()
        self.views = tuple(views)

    def draw(self, image: torch.Tensor, choices=None) -> tuple[torch.Tensor, int]:
        views = self.views if choices is None else tuple(int(v) for v in choices)
        view = views[int(torch.randint(0, len(views), (1,)))] if len(views) > 1 else views[0]
        return apply_view(image, view), view

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.draw(image)[0]

    def extra_repr(self) -> str:
        return f"views={self.views}"


def normalize_transform(aug: AugmentConfig) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std))])


def build_train_transform(aug: AugmentConfig, stain: torch.nn.Module | None = None) -> "TrainTransform":
    return TrainTransform(aug, stain)


def build_eval_transform(aug: AugmentConfig, stain: torch.nn.Module | None = None) -> v2.Compose:
    if stain is None:
        return normalize_transform(aug)
    return v2.Compose(_stain_steps(stain) + list(normalize_transform(aug).transforms))


def _stain_steps(stain: torch.nn.Module | None) -> list[torch.nn.Module]:
    return [] if stain is None else [stain]


def training_views(aug: AugmentConfig) -> tuple[int, ...]:
    """The view numbers the configured flips and rotations draw from."""
    return view_group(aug.hflip, aug.vflip, aug.rot90)


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


class ViewedTransform(torch.nn.Module):
    """A training transform: stain normalisation, one drawn view, then what the subclass adds.
    ``forward`` gives what the dataset yields as the image; ``with_view`` also the view number."""

    teacher_view_is_pure: bool = False  # the teacher's input is the stain-normalised tile in one view, nothing else

    def __init__(self, aug: AugmentConfig, stain: torch.nn.Module | None = None):
        super().__init__()
        self.stain = _compose(_stain_steps(stain))
        self.view = RandomView(training_views(aug))
        self.normalize = normalize_transform(aug)

    @property
    def views(self) -> tuple[int, ...]:
        return self.view.views

    def with_view(self, image: torch.Tensor, choices=None):
        viewed, view = self.view.draw(self.stain(image), choices)
        return self.finish(viewed), view

    def finish(self, viewed: torch.Tensor):
        raise NotImplementedError

    def forward(self, image: torch.Tensor):
        return self.with_view(image)[0]


class TrainTransform(ViewedTransform):
    """uint8 tile -> one normalised training view (student and teacher see the same)."""

    def __init__(self, aug: AugmentConfig, stain: torch.nn.Module | None = None):
        super().__init__(aug, stain)
        steps = _photometric_steps(aug)
        self.photometric = _compose(steps)
        self.teacher_view_is_pure = not steps

    def finish(self, viewed: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.photometric(viewed))


class TwoViews(ViewedTransform):
    """uint8 tile -> (strong view for the student, weak view for the teacher), both normalised."""

    teacher_view_is_pure = True

    def __init__(self, aug: AugmentConfig, stain: torch.nn.Module | None = None):
        super().__init__(aug, stain)
        self.strong = _strong_photometric(aug)

    def finish(self, viewed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.strong(viewed)), self.normalize(viewed)


def transform_with_view(transform, image: torch.Tensor, choices=None, seed: int | None = None):
    """``(transformed image, view number)``; :data:`NO_VIEW` for a transform that draws no view. With
    ``seed`` the draws come from torch's CPU generator seeded with it, and the caller's generator state
    is restored afterwards (a sample's augmentation then does not depend on the loader worker)."""
    if seed is None:
        return _transform_with_view(transform, image, choices)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also seeds CUDA lazily, at ~0.3 ms a tile
        return _transform_with_view(transform, image, choices)


def _transform_with_view(transform, image: torch.Tensor, choices):
    if isinstance(transform, ViewedTransform):
        return transform.with_view(image, choices)
    return transform(image), NO_VIEW


def build_student_transform(aug: AugmentConfig, strong_augment: bool, stain: torch.nn.Module | None = None,
                            augment_on: str = "loader") -> ViewedTransform:
    """The training transform: one view for student and teacher, or two views with ``strong_augment``.
    With ``augment_on="device"`` only the stain normalisation and the view, as uint8; the rest runs per
    batch on the device (:mod:`moma.data.device_augment`)."""
    if augment_on == "device":
        from moma.data.device_augment import DeviceViews

        return DeviceViews(aug, strong_augment, stain)
    return TwoViews(aug, stain) if strong_augment else TrainTransform(aug, stain)
