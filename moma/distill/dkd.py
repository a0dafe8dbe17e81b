"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
Distillation", CVPR 2022, arXiv 2203.08679).

The KD loss splits into a target-class part (TCKD: the binary distribution target / not target)
and a non-target part (NCKD: the distribution among the other classes), and KD ties NCKD's weight
to the teacher's confidence: KD = TCKD + (1 - p^T_target) NCKD. DKD weights the two freely,
alpha * TCKD + beta * NCKD.

Defaults follow mdistiller's CIFAR-100 configuration: alpha 1, beta 8, T 4, cross-entropy 1, and
the DKD term ramped up linearly over the first 20 epochs (factor min(epoch / 20, 1) with 1-based
epochs, so 1/20 in the first epoch). The epoch comes from :meth:`on_epoch_start`, which the
training loop calls before every epoch, also after a resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from moma.distill.base import DistillMethod, MethodContext, MethodParams
from moma.distill.registry import register_method


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    r"""DKD loss (Zhao et al., CVPR 2022), batch mean, scaled by :math:`T^2` as mdistiller:

    .. math:: L_{DKD} = T^2 \frac{1}{N}\sum_i \Big[\alpha\,\mathrm{KL}(\mathbf b^T_i \,\|\, \mathbf b^S_i)
              + \beta\,\mathrm{KL}(\hat{\mathbf p}^T_i \,\|\, \hat{\mathbf p}^S_i)\Big]

    with :math:`\mathbf p = \mathrm{softmax}(z/T)`, :math:`\mathbf b = (p_t, 1 - p_t)` the binary
    target / non-target probabilities (TCKD) and :math:`\hat p_j = p_j / (1 - p_t)`, :math:`j \ne t`,
    the distribution among the non-target classes (NCKD). Computed from log-sum-exps, so a
    confident network gives no :math:`\log 0`.
    """
    target_mask = F.one_hot(target, student_logits.shape[1]).bool()
    tckd_s, nckd_s = _decoupled_log_probs(student_logits.float() / temperature, target_mask)
    tckd_t, nckd_t = _decoupled_log_probs(teacher_logits.float() / temperature, target_mask)
    tckd = (tckd_t.exp() * (tckd_t - tckd_s)).sum(1)
    nckd = (nckd_t.exp().masked_fill(target_mask, 0.0) * (nckd_t - nckd_s)).sum(1)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def _decoupled_log_probs(scaled: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log (p_t, 1 - p_t) as ``[B, 2]``, and log p_hat as ``[B, C]`` (its target column is meaningless)."""
    log_all = torch.logsumexp(scaled, dim=1, keepdim=True)
    log_others = torch.logsumexp(scaled.masked_fill(target_mask, float("-inf")), dim=1, keepdim=True)
    target_logit = scaled.masked_select(target_mask).unsqueeze(1)
    binary = torch.cat([target_logit - log_all, log_others - log_all], dim=1)
    return binary, scaled - log_others


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """mdistiller's ramp ``min(epoch / warmup, 1)`` for a 0-based ``epoch`` (mdistiller counts from 1)."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


@register_method
class DKD(DistillMethod):
    name = "dkd"
    summary = "decoupled KD: target-class (TCKD) and non-target-class (NCKD) parts of KD, weighted separately"
    reference = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022 (arXiv 2203.08679)"
    needs_teacher_classes = True
    default_ce_weight = 1.0
    default_kl_weight = 0.0

    class Params(MethodParams):
        alpha: float = Field(1.0, ge=0.0)
        beta: float = Field(8.0, ge=0.0)
        temperature: float = Field(4.0, gt=0.0)
        warmup_epochs: int = Field(20, ge=0)  # 0 = no warm-up

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        self.epoch = 0
        self.loss_weights = {"dkd": 1.0}  # alpha and beta are the weights; the warm-up scales the term

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def forward(self, student, teacher, batch):
        p = self.params
        # A pool tile has no label: its "target class" is the teacher's prediction.
        target = torch.where(batch.target >= 0, batch.target, teacher.logits.argmax(1))
        loss = dkd_loss(student.logits, teacher.logits, target, p.alpha, p.beta, p.temperature)
        return {"dkd": warmup_factor(self.epoch, p.warmup_epochs) * loss}
