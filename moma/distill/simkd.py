"""Knowledge distillation with the reused teacher classifier (Chen, Mei, Zhang, Wang, Wang & Feng,
"Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022, arXiv 2203.14001).

A projector maps the student's final feature map onto the teacher's final feature map (mean
squared error), and the student classifies with the *teacher's* classifier, frozen, applied to
the average-pooled projected map. The student's own classifier is not used; the deployable model
is the student backbone plus a head (projector, pooling, copy of the teacher's classifier), saved
with the checkpoint and rebuilt by :meth:`SimKD.build_deploy_head`.

As in the authors' code: the projector is conv1x1-BN-ReLU, conv3x3-BN-ReLU (an ordinary
convolution, ``groups=1``; the depthwise variant is commented out there), conv1x1-BN-ReLU, with
C_t / factor channels inside (factor 2); the larger of the two maps is average-pooled to the
smaller's size first; the loss is ``nn.MSELoss()`` on the (unpooled) maps; no cross-entropy and
no KL term (the official MoMA comparison script: ``-c 0 -d 0 -b 1``).

Reusing the classifier needs a teacher trained on the data's classes (the class order may differ:
the copied classifier's rows are put in the student's order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moma.distill.base import DistillMethod, MethodContext, MethodParams
from moma.distill.registry import register_method
from moma.errors import ConfigError
from moma.models.taps import TapOutputs


def simkd_loss(projected_student: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    r"""SimKD feature alignment loss (Chen et al., CVPR 2022; the authors' ``nn.MSELoss()``):

    .. math:: L_{SimKD} = \frac{1}{N C_t H W} \big\lVert f^t - P(f^s) \big\rVert_2^2

    with :math:`f^t` the teacher's final feature map and :math:`P` the projector applied to the
    student's final feature map.
    """
    return F.mse_loss(projected_student.float(), teacher_map.float())


def _projector(student_channels: int, teacher_channels: int, factor: int) -> nn.Sequential:
    mid = max(1, teacher_channels // factor)
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels), nn.ReLU(),
    )


class SimKDHead(nn.Module):
    """Projector + global average pooling + the teacher's (frozen) classifier.

    Fed the student's ``forward_features`` output. ``source_size``: when the student's map was
    larger than the teacher's at training time, it is first average-pooled to this size.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int, factor: int = 2,
                 source_size: list[int] | None = None):
        super().__init__()
        self.student_channels, self.teacher_channels, self.num_classes, self.factor = (
            student_channels, teacher_channels, num_classes, factor)
        self.source_size = tuple(source_size) if source_size else None
        self.projector = _projector(student_channels, teacher_channels, factor)
        self.classifier = nn.Linear(teacher_channels, num_classes)
        self.classifier.requires_grad_(False)

    def project(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.source_size is not None and tuple(feature_map.shape[-2:]) != self.source_size:
            feature_map = F.adaptive_avg_pool2d(feature_map, self.source_size)
        return self.projector(feature_map)

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        return self.classifier(projected.mean(dim=(2, 3)))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(feature_map))

    def spec(self) -> dict:
        return {"student_channels": self.student_channels, "teacher_channels": self.teacher_channels,
                "num_classes": self.num_classes, "factor": self.factor,
                "source_size": list(self.source_size) if self.source_size else None}


def _teacher_classifier(ctx: MethodContext, channels: int) -> nn.Linear:
    classifier = ctx.teacher.model.get_classifier() if hasattr(ctx.teacher.model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or classifier.in_features != channels:
        raise ConfigError(
            f"distill.method 'simkd' reuses the teacher's classifier on its pooled final feature map; the teacher "
            f"{type(ctx.teacher.model).__name__} has no linear classifier over its {channels} final channels"
        )
    return classifier


@register_method
class SimKD(DistillMethod):
    name = "simkd"
    summary = "reused teacher classifier: student's final map projected onto the teacher's (MSE), teacher's classifier"
    reference = "Chen et al., Knowledge Distillation with the Reused Teacher Classifier, CVPR 2022 (arXiv 2203.14001)"
    needs_teacher_classes = True  # the teacher's classifier must cover the data's classes
    default_ce_weight = 0.0
    default_kl_weight = 0.0
    student_has_unused_parameters = True  # the student's own classifier gets no gradient
    needs_teacher_feature_map = True  # the projection target is the teacher's final map: no teacher cache

    class Params(MethodParams):
        beta: float = 1.0
        factor: int = Field(2, ge=1)  # projector bottleneck: C_t / factor channels

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        s_map, t_map = ctx.student_probe.feature_map, ctx.teacher_probe.feature_map
        if s_map is None or t_map is None or s_map.dim() != 4 or t_map.dim() != 4:
            raise ConfigError("distill.method 'simkd' needs convolutional final feature maps (B, C, H, W) from both networks")
        size = (min(s_map.shape[-2], t_map.shape[-2]), min(s_map.shape[-1], t_map.shape[-1]))
        source_size = list(size) if tuple(s_map.shape[-2:]) != size else None
        classifier = _teacher_classifier(ctx, t_map.shape[1])
        self.head = SimKDHead(s_map.shape[1], t_map.shape[1], ctx.num_classes, params.factor, source_size)
        self._copy_classifier(classifier, ctx.teacher_class_order)
        self.loss_weights = {"simkd": params.beta}
        self._cached: tuple[TapOutputs, torch.Tensor] | None = None

    def _copy_classifier(self, classifier: nn.Linear, order: list[int] | None) -> None:
        rows = torch.as_tensor(order if order is not None else range(classifier.out_features), dtype=torch.long)
        with torch.no_grad():
            self.head.classifier.weight.copy_(classifier.weight[rows])
            self.head.classifier.bias.copy_(classifier.bias[rows])

    def forward(self, student, teacher, batch):
        projected = self.head.project(student.feature_map)
        target = teacher.feature_map.detach()
        if target.shape[-2:] != projected.shape[-2:]:
            target = F.adaptive_avg_pool2d(target, projected.shape[-2:])
        self._cached = (student, self.head.classify(projected))
        return {"simkd": simkd_loss(projected, target)}

    def student_logits(self, student: TapOutputs) -> torch.Tensor:
        """The teacher's classifier on the projected student map (computed once per step)."""
        if self._cached is not None and self._cached[0] is student:
            logits = self._cached[1]
            self._cached = None
            return logits
        return self.head(student.feature_map)

    def deploy_head(self) -> nn.Module:
        return self.head

    def deploy_head_spec(self) -> dict:
        return self.head.spec()

    @classmethod
    def build_deploy_head(cls, spec: dict) -> nn.Module:
        return SimKDHead(**spec)
