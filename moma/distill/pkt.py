"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018, arXiv 1803.10837).

Each sample's similarities to the others in the batch, turned into a conditional probability
distribution, should be the same for the student as for the teacher. Uses the pooled embeddings
of any two networks (their dimensions may differ) and the cosine-similarity kernel of the authors'
code. Defaults follow RepDistiller: beta = 30000 (``-b 30000``), no KL term.
"""

from __future__ import annotations

import torch

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float
from moma.distill.registry import register_method

EPS = 1e-7  # the authors' constant


def conditional_probabilities(embedding: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    r""":math:`p_{j|i} = K(x_i, x_j) / \sum_k K(x_i, x_k)` with the cosine kernel scaled to [0, 1],
    :math:`K(a, b) = \frac{1}{2}\big(\frac{a^\top b}{\|a\|\|b\|} + 1\big)`; the sum includes k = i, as in
    the authors' code."""
    unit = embedding / (embedding.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    r"""Probabilistic knowledge transfer loss (Passalis & Tefas 2018), the KL divergence between
    the teacher's and the student's conditional similarity distributions:

    .. math:: L_{PKT} = \frac{1}{N^2} \sum_{i,j} p^t_{j|i} \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

    The mean over all :math:`N^2` entries (the paper sums) is the authors' code and RepDistiller's,
    for which beta = 30000 is tuned; :math:`\epsilon = 10^{-7}`.
    """
    p_student = conditional_probabilities(as_float(student_embedding), eps)
    p_teacher = conditional_probabilities(as_float(teacher_embedding), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


@register_method
class ProbabilisticKT(DistillMethod):
    name = "pkt"
    summary = "probabilistic KT: match the batch's cosine-similarity distributions of pooled embeddings"
    reference = ("Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, "
                 "ECCV 2018 (arXiv 1803.10837)")

    class Params(MethodParams):
        beta: float = 30000.0

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        self.loss_weights = {"pkt": params.beta}

    def forward(self, student, teacher, batch):
        return {"pkt": pkt_loss(student.embedding, teacher.embedding)}
