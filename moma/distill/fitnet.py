"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015, arXiv 1412.6550).

A learned regressor maps the student's map at the hint stage onto the teacher's map at the same
stage, and the student is trained to make the two match (mean squared error). Defaults follow
RepDistiller: hint stage 2 (``--hint_layer 2``), beta = 100 (``-b 100``), no KL term (``-a 0``),
trained jointly with cross-entropy rather than in the paper's separate hint stage.
"""

from __future__ import annotations

import torch
from torch import nn

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float, resize_to
from moma.distill.registry import register_method
from moma.models.taps import resolve_stage


def hint_loss(regressed_student: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al. 2015), as a mean over elements:

    .. math:: L_{HT} = \frac{1}{N C H W} \big\| u_h(x) - r(v_g(x)) \big\|_2^2

    with :math:`u_h` the teacher's hint, :math:`v_g` the student's guided layer and :math:`r` the
    regressor (RepDistiller's ``HintLoss`` = ``nn.MSELoss()``; the paper's 1/2 is folded into beta).
    """
    return (as_float(regressed_student) - as_float(teacher_hint)).pow(2).mean()


class HintRegressor(nn.Module):
    """Student map (C_s, H_s, W_s) -> teacher map (C_t, H_t, W_t).

    A 1x1 convolution, BatchNorm and (optionally) ReLU: RepDistiller's ``ConvReg`` for maps of
    equal size. When the sizes differ (another architecture), the student map is first brought
    to the teacher's size: adaptive average pooling when it is larger, bilinear interpolation
    (``align_corners=False``) when it is smaller. Both are linear, so they commute with the 1x1
    convolution; RepDistiller instead uses strided or transposed convolutions for exact 2x
    ratios and fails on other ratios.
    """

    def __init__(self, student_channels: int, teacher_channels: int, teacher_size: tuple[int, int], relu: bool = True):
        super().__init__()
        self.teacher_size = tuple(teacher_size)
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(resize_to(x, self.teacher_size))))


@register_method
class FitNet(DistillMethod):
    name = "fitnet"
    summary = "FitNets hint: a learned 1x1-conv regressor maps a student stage onto the teacher's, MSE"
    reference = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015 (arXiv 1412.6550)"

    class Params(MethodParams):
        beta: float = 100.0
        stage: int = 2  # feature_info stage index, in both networks (RepDistiller hint_layer=2)
        connector_relu: bool = True  # RepDistiller's ConvReg; set false if the teacher's hint can be negative

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        student_stage = resolve_stage(ctx.student.model, params.stage)
        teacher_stage = resolve_stage(ctx.teacher.model, params.stage)
        self.student_stages, self.teacher_stages = (student_stage,), (teacher_stage,)
        student_map = ctx.student_probe.features[student_stage]
        teacher_map = ctx.teacher_probe.features[teacher_stage]
        self.regressor = HintRegressor(student_map.shape[1], teacher_map.shape[1], tuple(teacher_map.shape[-2:]),
                                       relu=params.connector_relu)
        self.loss_weights = {"fitnet": params.beta}

    def forward(self, student, teacher, batch):
        regressed = self.regressor(student.features[self.student_stages[0]])
        return {"fitnet": hint_loss(regressed, teacher.features[self.teacher_stages[0]])}
