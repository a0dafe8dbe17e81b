r"""Correlation congruence (Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, "Correlation Congruence for
Knowledge Distillation", ICCV 2019, arXiv 1904.01802).

Besides matching instances, the student should reproduce the correlations *between* instances.
Student and teacher pooled features are each embedded by a learned linear layer into a common
128-d space (RepDistiller's ``LinearEmbed``, ``--feat_dim 128``; both embeddings train), and the
loss compares the two. Defaults follow RepDistiller: beta = 0.02 (``-b 0.02``), no KL term.

Formulation. The default ``kernel='repdistiller'`` is the code the paper's authors shared with
RepDistiller (its ``Correlation``), for which beta = 0.02 is tuned: with
:math:`\delta_i = |f^s_i - f^t_i|`, the inner products of consecutive samples' residuals are
averaged. ``kernel='gaussian'`` is the paper's own formulation: correlation matrices
under a Gaussian RBF kernel approximated by its P-order Taylor series (gamma = 0.4, P = 2, as
torchdistill's example configuration), compared in squared Frobenius norm over :math:`n^2`; its
scale differs, so beta has to be re-tuned with it. torchdistill's ``CCKDLoss`` (gaussian) differs
from it in two ways: it does not square the Frobenius norm, and it applies the kernel to the raw
linear outputs; we L2-normalise them, since the Taylor series approximates the Gaussian RBF only
for unit vectors. On unit embeddings ours = n^2 * theirs^2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float
from moma.distill.registry import register_method


def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    r"""Correlation congruence in the authors' code form (Peng et al. 2019, via RepDistiller's
    ``Correlation``), on already-embedded features of equal dimension:

    .. math:: L_{CC} = \frac{1}{N-1} \sum_{i=1}^{N-1} \big\langle \delta_i, \delta_{i+1} \big\rangle,
       \qquad \delta_i = |f^s_i - f^t_i|

    (elementwise absolute value; consecutive samples of the batch form the pairs).
    """
    delta = (as_float(student_embedding) - as_float(teacher_embedding)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def gaussian_correlation(embedding: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    r"""Correlation matrix under the Taylor-approximated Gaussian RBF kernel (Peng et al. 2019):
    :math:`k(x, y) \approx e^{-2\gamma} \sum_{p=0}^{P} \frac{(2\gamma)^p}{p!} (x^\top y)^p` for
    L2-normalised :math:`x, y` (then :math:`\|x-y\|^2 = 2 - 2x^\top y`, so this is exp(-gamma||x-y||^2))."""
    unit = F.normalize(as_float(embedding), dim=1)
    dot = unit @ unit.t()
    series = sum((2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1))
    return math.exp(-2 * gamma) * series


def cc_gaussian_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                     gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    r"""Correlation congruence as in the paper (Peng et al. 2019):

    .. math:: L_{CC} = \frac{1}{n^2} \big\| \psi(F_t) - \psi(F_s) \big\|_F^2,
       \qquad \psi(F)_{ij} = k(f_i, f_j)

    with :math:`k` the Taylor-approximated Gaussian kernel of :func:`gaussian_correlation`.
    """
    n = student_embedding.shape[0]
    diff = gaussian_correlation(teacher_embedding, gamma, order) - gaussian_correlation(student_embedding, gamma, order)
    return diff.pow(2).sum() / n**2


@register_method
class CorrelationCongruence(DistillMethod):
    name = "cc"
    summary = "correlation congruence: learned linear embeddings of pooled features, correlation between samples"
    reference = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019 (arXiv 1904.01802)"

    class Params(MethodParams):
        beta: float = 0.02
        embed_dim: int = Field(128, ge=1)
        kernel: Literal["repdistiller", "gaussian"] = "repdistiller"
        gamma: float = Field(0.4, gt=0)  # gaussian kernel only
        order: int = Field(2, ge=1)  # gaussian kernel only: Taylor order P

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        self.embed_student = nn.Linear(ctx.student_probe.embedding.shape[1], params.embed_dim)
        self.embed_teacher = nn.Linear(ctx.teacher_probe.embedding.shape[1], params.embed_dim)
        self.loss_weights = {"cc": params.beta}

    def forward(self, student, teacher, batch):
        f_s = self.embed_student(student.embedding)
        f_t = self.embed_teacher(teacher.embedding)
        if self.params.kernel == "gaussian":
            return {"cc": cc_gaussian_loss(f_s, f_t, self.params.gamma, self.params.order)}
        return {"cc": cc_loss(f_s, f_t)}
