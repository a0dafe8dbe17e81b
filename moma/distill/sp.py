"""Similarity-preserving distillation (Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019, arXiv 1907.09682).

Inputs that the teacher finds similar should be similar for the student: the student matches the
teacher's batch x batch similarity matrix of one stage's activations. Only batch relations are
compared, so channel counts and spatial sizes may differ. Defaults follow RepDistiller: the last
stage's map (``feat[-2]``, i.e. timm stage -1), beta = 3000 (``-b 3000``), no KL term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float
from moma.distill.registry import register_method
from moma.models.taps import resolve_stage


def similarity_matrix(feature_map: torch.Tensor) -> torch.Tensor:
    r"""Row-L2-normalised Gram matrix of the flattened activations: :math:`\tilde G = \mathrm{rownorm}(Q Q^\top)`,
    :math:`Q \in \mathbb{R}^{b \times CHW}` (Tung & Mori 2019)."""
    flat = as_float(feature_map).flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    r"""Similarity-preserving loss (Tung & Mori 2019) for one stage pair:

    .. math:: L_{SP} = \frac{1}{b^2} \big\| \tilde G_T - \tilde G_S \big\|_F^2

    with :math:`b` the batch size and :math:`\tilde G` the row-normalised batch Gram matrices.
    Rows are L2-normalised, as in the paper and RepDistiller; torchdistill 1.1.5's ``SPKDLoss``
    passes ``1`` as ``normalize``'s p and so L1-normalises them (a different, smaller loss).
    """
    batch = student_map.shape[0]
    return (similarity_matrix(teacher_map) - similarity_matrix(student_map)).pow(2).sum() / batch**2


@register_method
class SimilarityPreserving(DistillMethod):
    name = "sp"
    summary = "similarity-preserving: match the batch similarity matrix of the last stage's activations"
    reference = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019 (arXiv 1907.09682)"

    class Params(MethodParams):
        beta: float = 3000.0
        stage: int = -1  # feature_info stage index in both networks; -1 = the last map (RepDistiller feat[-2])

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        self.student_stages = (resolve_stage(ctx.student.model, params.stage),)
        self.teacher_stages = (resolve_stage(ctx.teacher.model, params.stage),)
        self.loss_weights = {"sp": params.beta}

    def forward(self, student, teacher, batch):
        return {"sp": sp_loss(student.features[self.student_stages[0]], teacher.features[self.teacher_stages[0]])}
