"""The vanilla student: cross-entropy only, no teacher."""

from __future__ import annotations

from moma.distill.base import DistillMethod
from moma.distill.registry import register_method


@register_method
class NoDistillation(DistillMethod):
    name = "none"
    summary = "no distillation: the student trained with cross-entropy only (the 'vanilla' row)"
    reference = "-"
    requires_teacher = False
    uses_unlabelled = False  # cross-entropy only: nothing learns from a tile without a label

    def forward(self, student, teacher, batch):
        return {}
