"""FixMatch (Sohn, Berthelot, Li, Zhang, Carlini, Cubuk, Kurakin, Zhang & Raffel, "FixMatch:
Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020, arXiv 2001.07685).

No teacher: the student's own prediction on the weak view of a tile, where it is confident
(probability at least ``threshold``, 0.95 in the paper), is the hard target of its prediction on
the strong view of the same tile. As in the paper, the labelled tiles are part of the unlabelled
set, so the term covers every row, and it is the mean over all rows with the mask as a weight.

The weak view's forward pass runs without gradient, with the student in its current mode (as the
reference code, which passes both views through the network in training mode).
"""

from __future__ import annotations

import torch
from pydantic import Field

from moma.distill.base import Batch, DistillMethod, MethodContext, MethodParams
from moma.distill.pseudo import confident_hard_labels, masked_cross_entropy
from moma.distill.registry import register_method
from moma.errors import ConfigError
from moma.models.taps import FeatureTap


def fixmatch_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""FixMatch's unlabelled loss and the share of rows it uses:

    .. math:: L_u = \frac{1}{N}\sum_i [\max_c q_{ic} \ge \tau]\;\mathrm{CE}\big(z^{strong}_i, \arg\max_c q_{ic}\big),
              \qquad q = \mathrm{softmax}(z^{weak})

    Returns ``(L_u, mask_rate)``; the weak view's side carries no gradient.
    """
    hard, mask = confident_hard_labels(weak_logits, threshold)
    return masked_cross_entropy(strong_logits, hard, mask), mask.mean()


@register_method
class FixMatch(DistillMethod):
    name = "fixmatch"
    summary = "FixMatch: the student's own confident weak-view predictions supervise its strong view (no teacher)"
    reference = ("Sohn et al., FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence, "
                 "NeurIPS 2020 (arXiv 2001.07685)")
    requires_teacher = False
    needs_strong_view = True
    default_ce_weight = 1.0
    default_kl_weight = 0.0

    class Params(MethodParams):
        threshold: float = Field(0.95, ge=0.0, le=1.0)
        weight: float = Field(1.0, ge=0.0)  # lambda_u

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        self._student_ref = (ctx.student,)  # a tuple: the student is not a submodule of the method
        self.loss_weights = {"fixmatch": params.weight}

    @property
    def student_tap(self) -> FeatureTap:
        return self._student_ref[0]

    def weak_logits(self, batch: Batch) -> torch.Tensor:
        """The student's logits on the weak view, without gradient."""
        if batch.teacher_input is None:
            raise ConfigError("distill.method 'fixmatch' needs a weak and a strong view of each tile: "
                              "set data.strong_augment=true")
        with torch.no_grad():
            return self.student_tap(batch.weak_input).logits

    def forward(self, student, teacher, batch):
        weak = self.weak_logits(batch)
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            loss, mask_rate = fixmatch_loss(student.logits, weak, self.params.threshold)
        return {"fixmatch": loss, "fixmatch_mask": mask_rate}
