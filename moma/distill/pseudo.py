"""Pseudo-labelling (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method
for Deep Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning).

The teacher's class of highest probability is a hard target for the student wherever the teacher
is confident (probability at least ``threshold``). The term covers every row of the batch, the
unlabelled pool and the labelled tiles alike (their true labels are the task's cross-entropy's
business), and is normalised by the number of rows as in FixMatch, so the mask acts as a weight
rather than changing the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from moma.distill.base import DistillMethod, MethodContext, MethodParams
from moma.distill.registry import register_method


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision raised to float32; float32 and float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def confident_hard_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Hard labels :math:`\hat y_i = \arg\max_c p_{ic}` of :math:`p = \mathrm{softmax}(z)` and the
    mask :math:`m_i = [\max_c p_{ic} \ge \tau]` (float), both without gradient."""
    with torch.no_grad():
        confidence, hard = torch.softmax(_at_least_float32(logits), dim=1).max(dim=1)
    return hard, (confidence >= threshold).float()


def masked_cross_entropy(logits: torch.Tensor, hard: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{N}\sum_i m_i\,\mathrm{CE}(z_i, \hat y_i)` over all N rows."""
    per_row = F.cross_entropy(_at_least_float32(logits), hard, reduction="none")
    return (per_row * mask.to(per_row.dtype)).mean()


def pseudo_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pseudo-label loss and the share of rows it uses:

    .. math:: L = \frac{1}{N}\sum_i [\max_c p^T_{ic} \ge \tau]\;\mathrm{CE}\big(z^S_i, \arg\max_c p^T_{ic}\big),
              \qquad p^T = \mathrm{softmax}(z^T)

    Returns ``(L, mask_rate)``; the teacher's side carries no gradient.
    """
    hard, mask = confident_hard_labels(teacher_logits, threshold)
    return masked_cross_entropy(student_logits, hard, mask), mask.mean()


@register_method
class PseudoLabel(DistillMethod):
    name = "pseudo"
    summary = "pseudo-labelling: the teacher's confident hard labels as extra cross-entropy targets"
    reference = ("Lee, Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural "
                 "Networks, ICML 2013 Workshop on Challenges in Representation Learning")
    needs_teacher_classes = True
    default_ce_weight = 1.0
    default_kl_weight = 0.0

    class Params(MethodParams):
        threshold: float = Field(0.95, ge=0.0, le=1.0)
        weight: float = Field(1.0, ge=0.0)

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        self.loss_weights = {"pseudo": params.weight}

    def forward(self, student, teacher, batch):
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            loss, mask_rate = pseudo_label_loss(student.logits, teacher.logits, self.params.threshold)
        return {"pseudo": loss, "pseudo_mask": mask_rate}
