"""Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, "Variational
Information Distillation for Knowledge Transfer", CVPR 2019, arXiv 1904.05835).

Maximises a variational lower bound on the mutual information between teacher and student
features: on every intermediate stage, a small learned network predicts the mean of a Gaussian
over the teacher's map from the student's map, with a learned per-channel variance, and the
student minimises the teacher map's negative log-likelihood. Defaults follow RepDistiller:
regressor conv1x1-ReLU-conv1x1-ReLU-conv1x1 (bias-free, hidden width = the teacher's channels),
initial variance 5, eps 1e-5, stages ``feat[1:-1]`` (every timm stage but the first), beta = 1
(``-b 1``), no KL term. Maps of different spatial sizes are adaptive-average-pooled to the smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moma.distill.base import DistillMethod, MethodParams
from moma.distill.feature_ops import as_float, intermediate_stages, pool_to_common_size, resolve_pairs
from moma.distill.registry import register_method
from moma.errors import ConfigError


def vid_loss(predicted_mean: torch.Tensor, teacher_map: torch.Tensor, log_scale: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    r"""VID negative log-likelihood (Ahn et al. 2019), up to the constant :math:`\frac{1}{2}\log 2\pi`,
    averaged over samples, channels and positions:

    .. math:: L_{VID} = \frac{1}{NCHW} \sum_{n,c,h,w} \frac{1}{2}\Big(\frac{(t_{nchw} - \mu_{nchw})^2}{\sigma_c^2} + \log \sigma_c^2\Big),
       \qquad \sigma_c^2 = \log(1 + e^{\alpha_c}) + \epsilon

    with :math:`\mu` the regressor's prediction from the student's map and :math:`\alpha` the
    learned per-channel ``log_scale`` (softplus keeps the variance positive).
    """
    variance = (F.softplus(as_float(log_scale)) + eps).view(1, -1, 1, 1)
    error = (as_float(teacher_map) - as_float(predicted_mean)).pow(2)
    return (0.5 * (error / variance + torch.log(variance))).mean()


def inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class VariationalRegressor(nn.Module):
    """Student map -> predicted mean of the teacher map, plus the per-channel variance parameter."""

    def __init__(self, student_channels: int, teacher_channels: int, init_variance: float, eps: float):
        super().__init__()
        hidden = teacher_channels  # RepDistiller: VIDLoss(s, t, t)
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, teacher_channels, kernel_size=1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), inverse_softplus(init_variance - eps)))
        self.eps = eps

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        student_map, teacher_map = pool_to_common_size(student_map, teacher_map)
        return vid_loss(self.mean(student_map), teacher_map, self.log_scale, self.eps)


@register_method
class VariationalInformationDistillation(DistillMethod):
    name = "vid"
    summary = "variational information distillation: Gaussian likelihood of teacher maps given student maps"
    reference = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019 (arXiv 1904.05835)"

    class Params(MethodParams):
        beta: float = 1.0
        stages: list[int] | None = Field(None, min_length=1)  # None: every stage but the first (RepDistiller feat[1:-1])
        init_variance: float = Field(5.0, gt=0)
        eps: float = Field(1e-5, gt=0)

    def __init__(self, params: Params, ctx):
        super().__init__(params, ctx)
        if params.init_variance <= params.eps:
            raise ConfigError("distill.params.init_variance must be larger than distill.params.eps")
        stages = params.stages if params.stages is not None else intermediate_stages(ctx)
        self.student_stages, self.teacher_stages = resolve_pairs(ctx, stages)
        self.regressors = nn.ModuleList(
            VariationalRegressor(ctx.student_probe.features[s].shape[1], ctx.teacher_probe.features[t].shape[1],
                                 params.init_variance, params.eps)
            for s, t in zip(self.student_stages, self.teacher_stages)
        )
        self.loss_weights = {"vid": params.beta}

    def forward(self, student, teacher, batch):
        pairs = zip(self.regressors, self.student_stages, self.teacher_stages)
        return {"vid": sum(regressor(student.features[s], teacher.features[t]) for regressor, s, t in pairs)}
