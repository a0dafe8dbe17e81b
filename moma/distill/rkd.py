"""Relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
CVPR 2019, arXiv 1904.05068).

The student reproduces the *structure* of the teacher's embedding space: pairwise distances
(normalised by their mean, so the overall scale is free) and the angles formed by triplets of
samples, both compared with the Huber loss. Works on the pooled embeddings of any two networks
(their dimensions may differ). Defaults follow RepDistiller: distance weight 25, angle weight 50,
beta = 1 (``-b 1``), no KL term. The two terms are logged separately; the weight of each is
beta times its own weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float
from moma.distill.registry import register_method


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix, zero on the diagonal. The squared distances are clamped at
    ``eps`` before the square root so the gradient stays finite for coinciding samples."""
    squared_norms = embedding.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * embedding @ embedding.t()).clamp(min=eps)
    off_diagonal = 1.0 - torch.eye(len(embedding), device=embedding.device, dtype=embedding.dtype)
    return squared.sqrt() * off_diagonal


def normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
    r""":math:`\psi_D(t_i, t_j) = \|t_i - t_j\|_2 / \mu`, with :math:`\mu` the mean distance over pairs i != j."""
    distances = pairwise_distances(embedding)
    n = len(embedding)
    mean = distances.sum() / (n * (n - 1))
    return distances / mean


def triplet_angles(embedding: torch.Tensor) -> torch.Tensor:
    r"""Cosines :math:`\psi_A(t_j, t_i, t_k) = \langle e_{ij}, e_{ik} \rangle` with
    :math:`e_{ij} = \frac{t_j - t_i}{\|t_j - t_i\|_2}`,
    an (N, N, N) tensor indexed [i, j, k] (the angle at vertex i). Degenerate triplets (j = i or
    k = i) have a zero vector and so a zero cosine."""
    directions = F.normalize(embedding[None, :, :] - embedding[:, None, :], p=2, dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_distance_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    r"""Distance-wise RKD loss (Park et al. 2019):

    .. math:: L_{RKD-D} = \frac{1}{N^2} \sum_{i,j} \ell_\delta\big(\psi_D(t_i, t_j), \psi_D(s_i, s_j)\big)

    with :math:`\ell_\delta` the Huber loss (:math:`\delta = 1`, i.e. smooth L1) and
    :math:`\psi_D` the distance divided by the batch's mean distance. The mean runs over all
    :math:`N^2` entries including the (zero) diagonal, as in the authors' code and RepDistiller.
    """
    student_d = normalised_distances(as_float(student_embedding))
    with torch.no_grad():
        teacher_d = normalised_distances(as_float(teacher_embedding))
    return F.smooth_l1_loss(student_d, teacher_d, beta=1.0)


def rkd_angle_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    r"""Angle-wise RKD loss (Park et al. 2019):

    .. math:: L_{RKD-A} = \frac{1}{N^3} \sum_{i,j,k} \ell_\delta\big(\psi_A(t_i, t_j, t_k), \psi_A(s_i, s_j, s_k)\big)

    with :math:`\psi_A` the cosine of the angle the triplet forms (see :func:`triplet_angles`) and
    :math:`\ell_\delta` the Huber loss (:math:`\delta = 1`). Degenerate triplets contribute zero on
    both sides but count in the mean, as in the authors' code and RepDistiller.
    """
    student_a = triplet_angles(as_float(student_embedding))
    with torch.no_grad():
        teacher_a = triplet_angles(as_float(teacher_embedding))
    return F.smooth_l1_loss(student_a, teacher_a, beta=1.0)


@register_method
class RelationalKD(DistillMethod):
    name = "rkd"
    summary = "relational KD: match normalised pairwise distances and triplet angles of pooled embeddings"
    reference = "Park et al., Relational Knowledge Distillation, CVPR 2019 (arXiv 1904.05068)"

    class Params(MethodParams):
        beta: float = 1.0
        distance_weight: float = 25.0
        angle_weight: float = 50.0

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        self.loss_weights = {
            "rkd_distance": params.beta * params.distance_weight,
            "rkd_angle": params.beta * params.angle_weight,
        }

    def forward(self, student, teacher, batch):
        return {
            "rkd_distance": rkd_distance_loss(student.embedding, teacher.embedding),
            "rkd_angle": rkd_angle_loss(student.embedding, teacher.embedding),
        }
