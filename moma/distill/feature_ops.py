"""Small helpers shared by the feature-based methods: which stages to pair, spatial matching.

Stage indices are timm ``feature_info`` indices (negative allowed), resolved separately for the
student and the teacher, so ``-1`` is each network's last stage even when they have different
numbers of stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moma.distill.base import MethodContext
from moma.models.taps import num_stages, resolve_stage


def as_float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (losses are computed outside the autocast precision; float64 is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def intermediate_stages(ctx: MethodContext) -> list[int]:
    """Every stage but the first, aligned from the end when the two networks differ in depth.

    This is RepDistiller's ``feat[1:-1]`` (mdistiller's ``feats[1:]``): its CIFAR networks list
    the stem output, the residual stages and the pooled vector; AT, VID and friends use the
    residual stages. timm's stage 0 is the stride-2 stem (or first block), so the equivalent is
    stages 1..n-1, written here as negative indices -(n-1)..-1 with n = the smaller stage count.
    """
    depth = min(num_stages(ctx.student.model), num_stages(ctx.teacher.model))
    if depth < 2:
        raise ValueError("the default intermediate stages need networks with at least 2 feature stages")
    return list(range(-(depth - 1), 0))


def resolve_pairs(ctx: MethodContext, stages: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Positive (student, teacher) stage indices for the same list of possibly negative indices."""
    student = tuple(resolve_stage(ctx.student.model, s) for s in stages)
    teacher = tuple(resolve_stage(ctx.teacher.model, s) for s in stages)
    return student, teacher


def pool_to_common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two NCHW maps to the smaller's spatial size.

    Per dimension: both end up at (min(H_a, H_b), min(W_a, W_b)). RepDistiller's AT and VID do
    the same for square maps (they compare heights only).
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring an NCHW map to ``size``: adaptive average pooling when it is at least as large in
    both dimensions (no information skipped), bilinear interpolation otherwise."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
