"""Logit distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
NIPS Deep Learning Workshop 2015, arXiv 1503.02531)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moma.distill.base import DistillMethod
from moma.distill.registry import register_method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""KL divergence between temperature-softened distributions, scaled by :math:`T^2`:

    .. math:: L_{KD} = T^2 \cdot \frac{1}{N} \sum_i \mathrm{KL}\big(\sigma(z^t_i / T) \,\|\, \sigma(z^s_i / T)\big)

    The :math:`T^2` factor keeps the gradient scale independent of T (Hinton et al. 2015, sec. 2).
    ``reduction='batchmean'`` as in RepDistiller's ``DistillKL`` and the official MoMA code.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


@register_method
class KD(DistillMethod):
    """Hinton KD. The KL term itself is the loop's shared ``kl`` term (every method can add it);
    this method only sets its weights to RepDistiller's defaults: 0.1 * CE + 0.9 * KL, T = 4."""

    name = "kd"
    summary = "logit distillation: KL to the teacher's temperature-softened probabilities"
    reference = "Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 1503.02531 (2015)"
    needs_teacher_classes = True
    default_ce_weight = 0.1
    default_kl_weight = 0.9

    def forward(self, student, teacher, batch):
        return {}
