"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv 1612.03928).

The student matches the teacher's spatial attention maps (where the activations are strong) on
every intermediate stage. No learned parameters, so it works between any two CNNs: channel counts
do not enter the maps, and maps of different sizes are average-pooled to the smaller one.
Defaults follow RepDistiller: p = 2, stages ``feat[1:-1]`` (every timm stage but the first),
beta = 1000 (``-b 1000``), no KL term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float, intermediate_stages, pool_to_common_size, resolve_pairs
from moma.distill.registry import register_method


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    r"""Spatial attention of an NCHW map, flattened and L2-normalised per sample:
    :math:`Q = \mathrm{vec}\big(\frac{1}{C}\sum_c |A_c|^p\big) / \|\cdot\|_2`.

    The channel mean (not the paper's sum) is the authors' code; after normalisation the two agree.
    """
    return F.normalize(as_float(feature_map).abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    r"""Attention-transfer loss for one stage (Zagoruyko & Komodakis 2017, eq. 2, in the form of
    the authors' code and RepDistiller):

    .. math:: L_{AT} = \frac{1}{N\,HW} \sum_{i=1}^{N} \big\| Q_S^{(i)} - Q_T^{(i)} \big\|_2^2,
       \qquad Q = \frac{\mathrm{vec}(\frac{1}{C}\sum_c |A_c|^p)}{\|\mathrm{vec}(\frac{1}{C}\sum_c |A_c|^p)\|_2}

    The paper writes the un-squared p-norm of the difference; the squared mean is what its authors
    (and RepDistiller, torchdistill's default ``mode='code'``) train with, and what beta=1000 is tuned
    for. Maps of different spatial sizes are first adaptive-average-pooled to the smaller one.
    """
    student_map, teacher_map = pool_to_common_size(student_map, teacher_map)
    return (attention_map(student_map, p) - attention_map(teacher_map, p)).pow(2).mean()


@register_method
class AttentionTransfer(DistillMethod):
    name = "at"
    summary = "attention transfer: match normalised spatial attention maps on every intermediate stage"
    reference = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017 (arXiv 1612.03928)"

    class Params(MethodParams):
        beta: float = 1000.0
        p: float = 2.0
        stages: list[int] | None = Field(None, min_length=1)  # None: every stage but the first (RepDistiller feat[1:-1])

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        stages = params.stages if params.stages is not None else intermediate_stages(ctx)
        self.student_stages, self.teacher_stages = resolve_pairs(ctx, stages)
        self.loss_weights = {"at": params.beta}

    def forward(self, student, teacher, batch):
        pairs = zip(self.student_stages, self.teacher_stages)
        return {"at": sum(at_loss(student.features[s], teacher.features[t], self.params.p) for s, t in pairs)}
